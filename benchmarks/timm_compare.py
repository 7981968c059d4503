r"""Our Mixer against timm's matching model (PyTorch), side by side in one run.

  python benchmarks/timm_compare.py --variant=S/32 --batch_size=32 --mode=train
  python benchmarks/timm_compare.py --variant=S/32 --batch_size=32 --mode=eval

Both sides do the same work on the same machine with the same thread count: train =
forward, backward, clip by global norm 1, AdamW (weight decay 0.1), one step of a
batch of random images with random labels; eval = the forward pass of a batch. The
two are measured in alternating rounds (ours, timm, ours, timm, ...) so that a slow
patch of the machine hits both; each figure is the median over all timed steps.

Needs torch and timm, which are NOT project requirements (CI does not have them):
  pip install torch==2.13.0 && pip install timm --no-deps
(timm imports torchvision at import time; if PyPI's torchvision does not import beside
a CPU-only torch, `pip install torchvision==0.16.2 --no-deps` does: timm only uses its
pure-Python FrozenBatchNorm2d, its compiled ops are never called.)
The last stdout line is one JSON object.
"""

import argparse
import json
import os
import statistics
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from mixer_jax import benchmark  # noqa: E402

# Our variant name -> timm's model name (224px, 1000 classes).
TIMM_NAMES = {"S/32": "mixer_s32_224", "S/16": "mixer_s16_224", "B/32": "mixer_b32_224",
              "B/16": "mixer_b16_224", "L/32": "mixer_l32_224", "L/16": "mixer_l16_224"}


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


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  threads = args.threads or benchmark.cpu_description()["cores"]
  import jax
  ours_args = benchmark.parse_args([f"--variant={args.variant}",
                                    f"--batch_size={args.batch_size}", f"--mode={args.mode}"])
  if args.mode == "train":
    bench = benchmark.TrainBench(ours_args)
    ours_step, ours_flops = bench.run, bench.flops_per_image()
    num_params = bench.num_params
  else:
    forward, params, images, compiled = benchmark.forward_bench(ours_args)
    ours_step = lambda: compiled(params, images)
    ours_flops = benchmark.compiled_flops(compiled) / args.batch_size
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  timm_side = TimmSide(args.variant, args.batch_size, threads, args.mode)
  if timm_side.num_params != num_params:
    print(f"note: parameter counts differ: ours {num_params:,}, timm {timm_side.num_params:,}")

  peak = benchmark.measure_peak("float32", args.peak_size) if args.peak_size else {}
  timed(ours_step, args.warmup, jax.block_until_ready)
  timed(timm_side.step, args.warmup)
  ours, theirs = [], []
  for _ in range(args.rounds):
    ours += timed(ours_step, args.steps, jax.block_until_ready)
    theirs += timed(timm_side.step, args.steps)
  ours_ips = args.batch_size / statistics.median(ours)
  timm_ips = args.batch_size / statistics.median(theirs)
  result = {
      "mode": args.mode, "variant": args.variant, "timm_model": TIMM_NAMES[args.variant],
      "batch_size": args.batch_size, "dtype": "float32", "threads": threads,
      "ours_images_per_s": ours_ips, "timm_images_per_s": timm_ips,
      "ratio": ours_ips / timm_ips, "ours_step_time_s": statistics.median(ours),
      "timm_step_time_s": statistics.median(theirs), "timed_steps_each": len(ours),
      "flops_per_image": ours_flops, "ours_achieved_flops": ours_flops * ours_ips,
      "timm_achieved_flops": ours_flops * timm_ips, "num_params": num_params,
      "device": benchmark.device_description(), **timm_side.versions, **peak,
      "loadavg_1min": os.getloadavg()[0]}
  if peak:
    result["ours_utilisation_vs_matmul"] = result["ours_achieved_flops"] / peak["peak_matmul_flops"]
  print(f"{args.mode} {args.variant} batch {args.batch_size}, {threads} threads: "
        f"ours {ours_ips:.2f} img/s, timm {timm_ips:.2f} img/s, ratio {ours_ips / timm_ips:.2f}x")
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  main()
