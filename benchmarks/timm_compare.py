r"""Our model against timm's matching model (PyTorch), side by side in one run.

  python benchmarks/timm_compare.py --variant=S/32 --batch_size=32 --mode=train
  python benchmarks/timm_compare.py --variant=S/32 --batch_size=32 --mode=eval
  python benchmarks/timm_compare.py --variant=resmlp_12 --batch_size=32 --mode=train
  python benchmarks/timm_compare.py --variant=gmlp_s16 --batch_size=32 --mode=eval

Variants: the Mixers (S/32 ... L/16 -> timm's mixer_*_224), ResMLP (resmlp_12, _24, _36,
_big_24 -> resmlp_*_224) and gMLP (gmlp_ti16, _s16, _b16 -> gmlp_*_224), all at 224 px
with 1000 classes; the two sides' parameter counts must be equal (the run stops before
timing if not). GELU: timm's Mixers, ResMLPs and gMLPs all use the exact (erf) form; ours
uses the released Mixers' tanh form for the Mixer and the exact form for ResMLP and
gMLP (what their released weights were trained with), so for those two families both
sides compute the same function. The JSON's `gelu` names each side's.

Both sides do the same work on the same machine with the same thread count: train =
forward, backward, clip by global norm 1, AdamW (weight decay 0.1), one step of a
batch of random images with random labels; eval = the forward pass of a batch. The
two are measured in alternating rounds (ours, timm, ours, timm, ...) so that a slow
patch of the machine hits both; each figure is the median over all timed steps. Each
side runs in its own worker process, as each would in real use: a shared process
would share one malloc heap, threads and caches between the two runtimes. Ours runs
as mixer_jax's entry points configure themselves (host_memory.py's malloc settings);
timm runs with PyTorch's defaults, or with the same settings under --timm_keep_host_memory.

Needs mixer_jax installed (`pip install -e .` in the repository), and torch and timm,
which are NOT project requirements (CI does not have them):
  pip install torch==2.13.0 && pip install timm --no-deps
(timm imports torchvision at import time; if PyPI's torchvision does not import beside
a CPU-only torch, `pip install torchvision==0.16.2 --no-deps` does: timm only uses its
pure-Python FrozenBatchNorm2d, its compiled ops are never called.)
The last stdout line is one JSON object.
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time

from mixer_jax import host_memory

# Our variant name -> timm's model name (224px, 1000 classes).
TIMM_NAMES = {"S/32": "mixer_s32_224", "S/16": "mixer_s16_224", "B/32": "mixer_b32_224",
              "B/16": "mixer_b16_224", "L/32": "mixer_l32_224", "L/16": "mixer_l16_224",
              "resmlp_12": "resmlp_12_224", "resmlp_24": "resmlp_24_224",
              "resmlp_36": "resmlp_36_224", "resmlp_big_24": "resmlp_big_24_224",
              "gmlp_ti16": "gmlp_ti16_224", "gmlp_s16": "gmlp_s16_224",
              "gmlp_b16": "gmlp_b16_224"}


def gelu_forms(variant: str) -> dict:
  """Each side's GELU: timm's Mixer, ResMLP and gMLP all use nn.GELU (erf); ours the
  tanh form for the Mixer (the released weights'), erf for ResMLP and gMLP (their
  `approximate_gelu=False` default, which the benchmark keeps)."""
  return {"ours": "tanh" if TIMM_NAMES[variant].startswith("mixer_") else "erf",
          "timm": "erf"}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="S/32", choices=sorted(TIMM_NAMES))
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--mode", default="train", choices=("train", "eval"))
  p.add_argument("--rounds", type=int, default=4, help="Alternating measurement rounds.")
  p.add_argument("--steps", type=int, default=5, help="Timed steps per side per round.")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="0 = every usable core.")
  p.add_argument("--peak_size", type=int, default=2048)
  p.add_argument("--timm_keep_host_memory", action="store_true",
                 help="Give timm's process the malloc settings ours uses (host_memory.py) "
                      "instead of PyTorch's default.")
  return p.parse_args(argv)


class TimmSide:
  """timm's model with PyTorch's AdamW, in float32 on the CPU."""

  def __init__(self, variant, batch_size, threads, mode):
    import timm
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch, self.mode = torch, mode
    self.model = timm.create_model(TIMM_NAMES[variant], num_classes=1000)
    self.images = torch.rand(batch_size, 3, 224, 224) * 2 - 1
    self.labels = torch.randint(0, 1000, (batch_size,))
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999),
                                 eps=1e-8, weight_decay=0.1)
    self.loss = torch.nn.CrossEntropyLoss()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.versions = {"torch": torch.__version__, "timm": timm.__version__}
    self.model.train(mode == "train")
    self.block = lambda x: x  # PyTorch on the CPU runs eagerly: nothing to wait for.

  def step(self):
    torch = self.torch
    if self.mode == "eval":
      with torch.inference_mode():
        return self.model(self.images)
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(self.model(self.images), self.labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    return loss


def timed(fn, steps, block=lambda x: x):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return times


def _page_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class OursSide:
  """Our train step (or forward) exactly as `python -m mixer_jax.tools.benchmark` builds it."""

  def __init__(self, args):
    from mixer_jax.tools import benchmark
    import jax
    ours_args = benchmark.parse_args([f"--variant={args.variant}",
                                      f"--batch_size={args.batch_size}", f"--mode={args.mode}"])
    bench = (benchmark.TrainBench if args.mode == "train" else benchmark.ForwardBench)(ours_args)
    self.step, self.flops = bench.run, bench.flops_per_image()
    self.num_params = bench.num_params
    self.block = jax.block_until_ready
    self.info = {"num_params": self.num_params, "flops_per_image": self.flops,
                 "device": benchmark.device_description()}
    if args.peak_size:
      self.info.update(benchmark.measure_peak("float32", args.peak_size))


def _worker(side: str, args, conn):
  """One side in its own process: its own allocator settings, threads and caches."""
  # First, before JAX or torch starts threads; timm gets PyTorch's defaults unless asked.
  kept = False
  if side == "ours" or args.timm_keep_host_memory:
    kept = host_memory.keep_freed_memory()
  if side == "timm":
    runner = TimmSide(args.variant, args.batch_size, args.threads, args.mode)
    runner.info = {"num_params": runner.num_params, **runner.versions,
                   "keep_host_memory": kept}
  else:
    runner = OursSide(args)
  timed(runner.step, args.warmup, runner.block)
  conn.send(runner.info)
  while True:
    steps = conn.recv()
    if steps is None:
      return
    faults = _page_faults()
    times = timed(runner.step, steps, runner.block)
    conn.send((times, (_page_faults() - faults) / steps))


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  args.threads = args.threads or len(os.sched_getaffinity(0))
  ctx = multiprocessing.get_context("spawn")
  sides, info = {}, {}
  try:
    for side in ("ours", "timm"):  # One at a time: the peak matmul is timed undisturbed.
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=_worker, args=(side, args, child), daemon=True)
      proc.start()
      sides[side] = (proc, parent)
      info[side] = parent.recv()  # Built and warmed up.
    if info["timm"]["num_params"] != info["ours"]["num_params"]:  # Not the same model.
      raise SystemExit(
          f"Error: parameter counts differ: ours {info['ours']['num_params']:,} "
          f"({args.variant}), timm {info['timm']['num_params']:,} ({TIMM_NAMES[args.variant]}).")
    times = {"ours": [], "timm": []}
    faults = {"ours": [], "timm": []}
    for _ in range(args.rounds):
      for side, (_, conn) in sides.items():  # Alternating: a slow patch hits both.
        conn.send(args.steps)
        round_times, round_faults = conn.recv()
        times[side] += round_times
        faults[side].append(round_faults)
  finally:
    for proc, conn in sides.values():
      try:
        conn.send(None)
      except (BrokenPipeError, OSError):
        pass
      proc.join(timeout=60)
  ours, timm_info = info["ours"], info["timm"]
  ours_ips = args.batch_size / statistics.median(times["ours"])
  timm_ips = args.batch_size / statistics.median(times["timm"])
  flops = ours["flops_per_image"]
  result = {
      "mode": args.mode, "variant": args.variant, "timm_model": TIMM_NAMES[args.variant],
      "batch_size": args.batch_size, "dtype": "float32", "threads": args.threads,
      "gelu": gelu_forms(args.variant),
      "ours_images_per_s": ours_ips, "timm_images_per_s": timm_ips,
      "ratio": ours_ips / timm_ips, "ours_step_time_s": statistics.median(times["ours"]),
      "timm_step_time_s": statistics.median(times["timm"]),
      "timed_steps_each": len(times["ours"]),
      "ours_page_faults_per_step": statistics.median(faults["ours"]),
      "timm_page_faults_per_step": statistics.median(faults["timm"]),
      "ours_keep_host_memory": ours["device"]["keep_host_memory"],
      "timm_keep_host_memory": timm_info["keep_host_memory"],
      "flops_per_image": flops, "ours_achieved_flops": flops * ours_ips,
      "timm_achieved_flops": flops * timm_ips, "num_params": ours["num_params"],
      "device": ours["device"], "torch": timm_info["torch"], "timm": timm_info["timm"],
      "loadavg_1min": os.getloadavg()[0]}
  for key in ("peak_matmul_size", "peak_matmul_s", "peak_matmul_flops"):
    if key in ours:
      result[key] = ours[key]
  if "peak_matmul_flops" in ours:
    result["ours_utilisation_vs_matmul"] = result["ours_achieved_flops"] / ours["peak_matmul_flops"]
  print(f"{args.mode} {args.variant} batch {args.batch_size}, {args.threads} threads: "
        f"ours {ours_ips:.2f} img/s, timm {timm_ips:.2f} img/s, ratio {ours_ips / timm_ips:.2f}x")
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  main()
