r"""Throughput of the Mixer train step, eval forward and input pipeline on this machine.

  python -m mixer_jax.tools.benchmark --variant=S/32 --batch_size=32 --mode=train
  python -m mixer_jax.tools.benchmark --variant=B/16 --batch_size=256 --mode=eval --dtype=bfloat16
  python -m mixer_jax.tools.benchmark --mode=input         # tf.data alone, images/s per core
  python -m mixer_jax.tools.benchmark --mode=input --randaugment_on=both  # host vs device RA
  python -m mixer_jax.tools.benchmark --mode=end_to_end    # tf.data feeding the train step

Each timed figure is the median over `--steps` steps after `--warmup` untimed ones (the
first compiles). The train step is the one `main` runs (steps.make_train_step: forward,
backward, clip by global norm, AdamW; mixup / stochastic depth when asked), jitted with
the state donated. FLOPs per image are XLA's cost analysis of the unoptimised program (a
multiply-add counts 2). Utilisation is against a large matmul of the same dtype timed in
the same run; MFU, on known accelerators, against the datasheet peak. The last stdout
line is one JSON object with every figure.

`--mode=input` times the paper's ImageNet-1k recipe (Inception crop with the JPEG decoded
inside it, flip, RandAugment 2/15) with `--randaugment_on`: "host" is the former path
(flip and RandAugment in tf.data, float32 in [-1, 1] shipped, 4 bytes per value),
"device" the host's part when the train step augments (decode in the crop, resize:
uint8 shipped), "both" the two in alternating rounds of `--steps` batches (best round
reported), so that a slow spell of a shared machine falls on both.

The train and eval modes import no TensorFlow, tfds, ml_collections or clu (they run
where only jax, flax and optax are installed); `input` and `end_to_end` need TensorFlow.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
import types
from typing import Any, Callable, Dict, List, Optional

import jax
from jax.extend.core import jaxpr_as_fun
import jax.numpy as jnp
import numpy as np

from mixer_jax import host_memory
from mixer_jax import models
from mixer_jax import sharding
from mixer_jax import state
from mixer_jax import steps
from mixer_jax.errors import ConfigError
# TensorFlow and input_pipeline are imported inside the input and end_to_end modes
# only: the train and eval modes run where TensorFlow is not installed.

MODES = ("train", "eval", "input", "end_to_end")
RANDAUGMENT_ON = ("host", "device", "both")
DTYPES = ("float32", "bfloat16")

# Datasheet dense matmul peaks (FLOP/s) by a substring of jax's `device_kind`, first match
# first. float32 on NVIDIA GPUs is the TF32 peak (XLA's default precision runs float32 dots
# in TF32 there); TPUs run float32 dots as bfloat16 passes by default.
DATASHEET_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),     # SXM.
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),   # v5p.
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
)

# The paper's ImageNet-1k recipe (Table 4): the augmentation the input modes measure.
IMAGENET1K_AUGMENT = dict(train_crop="inception", train_flip=True, randaugment_layers=2,
                          randaugment_magnitude=15)


# ------------------------------------------------------------------------ flags
def _at_least(low, kind=int) -> Callable[[str], Any]:
  def parse(text: str):
    try:
      if kind(text) >= low:
        return kind(text)
    except ValueError:
      pass
    raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__} >= {low}")
  return parse


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One sentence through ConfigError, not argparse's exit.
    raise ConfigError(f"{message[0].upper()}{message[1:]}; see --help.")


def _parser() -> argparse.ArgumentParser:
  positive, natural = _at_least(1), _at_least(0)
  p = _Parser(prog="python -m mixer_jax.tools.benchmark", description=__doc__.split("\n")[0])
  p.add_argument("--mode", default="train", choices=MODES)
  p.add_argument("--variant", default="S/32",
                 help="Model variant, e.g. S/32, B/16 (Mixer), resmlp_12, gmlp_s16.")
  p.add_argument("--batch_size", type=positive, default=32)
  p.add_argument("--image_size", type=positive, default=224)
  p.add_argument("--dtype", default="float32", choices=DTYPES, help="Compute dtype.")
  p.add_argument("--num_classes", type=positive, default=1000)
  p.add_argument("--steps", type=positive, default=20, help="Timed steps.")
  p.add_argument("--warmup", type=natural, default=3, help="Untimed steps first.")
  p.add_argument("--remat_policy", default="none", choices=models.REMAT_POLICIES,
                 help="Rematerialise each block, keeping what the policy names.")
  p.add_argument("--scan", action="store_true",
                 help="Run the blocks under nn.scan (parameters stacked per block).")
  p.add_argument("--kernels", default="auto", choices=("auto", "xla", "cpu"),
                 help="The model's ops: plain flax (xla), kernels/cpu.py (cpu) or by backend.")
  p.add_argument("--mixup_alpha", type=_at_least(0, float), default=0.0,
                 help="ImageNet-1k recipe: 0.5.")
  p.add_argument("--stoch_depth", type=_at_least(0, float), default=0.0,
                 help="ImageNet-1k recipe: 0.1.")
  p.add_argument("--weight_decay", type=_at_least(0, float), default=0.1)
  for name in ("num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
    p.add_argument(f"--{name}", type=natural, default=0, help="0: the variant's value.")
  p.add_argument("--peak_size", type=natural, default=None,
                 help="Side of the matmul timed as the peak (0: none; default 2048 on "
                      "CPUs, 8192 on accelerators).")
  p.add_argument("--num_source_images", type=positive, default=64,
                 help="Generated 500x375 JPEGs (ImageNet's typical size) the input modes read.")
  p.add_argument("--rounds", type=positive, default=2,
                 help="end_to_end: alternating bare and fed windows of --steps each; "
                      "input with --randaugment_on=both: alternating host and device windows.")
  p.add_argument("--randaugment_on", default="both", choices=RANDAUGMENT_ON,
                 help="Where flip and RandAugment run: input mode: host (the former path, "
                      "float32 out), device (the host decodes, crops, resizes: uint8 out) or "
                      "both; train and end_to_end: host or device (both: by backend).")
  return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  """Flags -> validated namespace; a bad value raises ConfigError (one sentence)."""
  args = _parser().parse_args(argv)
  if args.mode == "end_to_end" and args.warmup < 1:
    raise ConfigError("--warmup must be at least 1 with --mode=end_to_end (the first "
                         "step compiles and fills the input pipeline).")
  if args.stoch_depth >= 1:
    raise ConfigError(f"--stoch_depth={args.stoch_depth} must be in [0, 1).")
  # The model is checked now (variant name, patch divisibility), before anything compiles.
  try:
    patch = models.preset(args.variant)[1]["patch_size"]
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if args.image_size % patch:
    raise ConfigError(f"--image_size={args.image_size} is not divisible by the patch "
                         f"size {patch} of {args.variant}; use a multiple of {patch}.")
  return args


# -------------------------------------------------------- the machine and timing
def device_description(with_jax: bool = True) -> Dict[str, Any]:
  """The host CPU (model name, usable cores) and, `with_jax`, JAX's devices."""
  cpu = os.uname().machine
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  out = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
         "keep_host_memory": host_memory.applied()}
  if with_jax:
    device = jax.devices()[0]
    out.update(platform=device.platform, device_kind=device.device_kind, jax=jax.__version__,
               device_count=jax.device_count(), xla_flags=os.environ.get("XLA_FLAGS", ""))
  return out


def datasheet_peak(device_kind: str, dtype: str) -> Optional[float]:
  return next((peaks[dtype] for key, peaks in DATASHEET_PEAKS
               if key.lower() in device_kind.lower()), None)


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> List[float]:
  """Seconds of each of `steps` calls after `warmup` untimed ones. Each call is blocked
  on, so that a step's time is its own (JAX dispatches asynchronously)."""
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return times


def program_flops(jitted, *args, lowered=None) -> Optional[float]:
  """FLOPs of one call of `jitted(*args)`: XLA's cost analysis of the unoptimised program.

  Not the compiled program's: XLA on GPU turns the matmuls into library calls its cost
  analysis does not count (a B/16 train step read 4.7 instead of 76 GFLOP per image on an
  H100). GPU plugins cannot analyse an unoptimised program, so there it is lowered again
  for the host CPU. `lowered`: `jitted.lower(*args)` where the caller already has it.
  """
  try:
    cost = (lowered or jitted.lower(*args)).cost_analysis()
  except NotImplementedError:
    # The computation without device shardings (of the jit or the arguments).
    plain = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    body = jitted.trace(*plain).jaxpr
    try:
      cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: no count.
      return None
    with jax.default_device(cpu):
      cost = jax.jit(jaxpr_as_fun(body)).lower(*body.in_avals).cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def measure_peak(dtype: str, size: int) -> Dict[str, float]:
  """FLOP/s of a `size` x `size` matmul in `dtype`: this machine's practical peak."""
  a, b = (jax.random.normal(jax.random.key(k), (size, size)).astype(dtype) for k in (1, 2))
  matmul = jax.jit(jnp.matmul)
  seconds = statistics.median(time_steps(lambda: matmul(a, b), warmup=2, steps=5))
  return {"peak_matmul_size": size, "peak_matmul_flops": 2.0 * size ** 3 / seconds}


# ------------------------------------------------------------------- the model
def model_overrides(args) -> Dict[str, int]:
  return {k: getattr(args, k) for k in ("num_blocks", "hidden_dim", "tokens_mlp_dim",
                                        "channels_mlp_dim") if getattr(args, k)}


def run_config(args) -> types.SimpleNamespace:
  """The config fields state.Setup reads (resolved: state.resolve_model): the plain
  step (the same work as timm's) unless --mixup_alpha/--stoch_depth ask for the
  recipe's."""
  from mixer_jax import state
  model = types.SimpleNamespace(
      variant=args.variant, family=None, name=None, patch_size=None,
      num_blocks=args.num_blocks or None, hidden_dim=args.hidden_dim or None,
      tokens_mlp_dim=args.tokens_mlp_dim or None,
      channels_mlp_dim=args.channels_mlp_dim or None, layerscale_init=None,
      approximate_gelu=None, stoch_depth=args.stoch_depth, dropout=0.0,
      remat_policy=args.remat_policy, scan=args.scan, kernels=args.kernels)
  config = types.SimpleNamespace(
      model=model, dtype=args.dtype, head_bias_init=0.0, image_size=args.image_size,
      seed=0, sharding="replicate", fsdp_min_size=2 ** 16, mesh_model=1,
      optimizer="adam", learning_rate=1e-3, warmup_steps=100, lr_decay="linear",
      end_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
      weight_decay=args.weight_decay, grad_clip_norm=1.0, label_smoothing=0.0,
      mixup_alpha=args.mixup_alpha, loss="softmax", grad_accum_steps=1, nonfinite="stop",
      # end_to_end feeds the recipe's augmentation; train times the plain step.
      **(IMAGENET1K_AUGMENT if args.mode == "end_to_end" else dict(
          train_crop="inception", train_flip=False, randaugment_layers=0,
          randaugment_magnitude=0)),
      randaugment_on="auto" if args.randaugment_on == "both" else args.randaugment_on)
  state.resolve_model(config)
  state.resolve_randaugment_on(config)
  return config


def random_batch(args):
  """A batch as the input pipeline ships it: uint8 images."""
  k1, k2 = jax.random.split(jax.random.key(3))
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  return {"image": jax.random.randint(k1, shape, 0, 256, jnp.int32).astype(jnp.uint8),
          "label": jax.random.randint(k2, (args.batch_size,), 0, args.num_classes)}


def _forward(model):
  """(params, uint8 images) -> logits, the images scaled on the device as the steps do."""
  return lambda p, x: model.apply({"params": p}, steps.to_model_range(x), train=False)


class TrainBench:
  """The train step as main builds it (state.Setup), compiled once for its batch."""

  def __init__(self, args):
    self.args = args
    self.setup = state.Setup(run_config(args), args.num_classes, total_steps=10_000)
    self.num_params = self.setup.num_params
    self.state = self.setup.init_state()
    self.step = self.setup.train_step()
    self.batch = random_batch(args)
    self.lowered = self.step.lower(self.state, self.batch)
    self.compiled = self.lowered.compile()

  def flops_per_image(self) -> Optional[float]:
    flops = program_flops(self.step, self.state, self.batch, lowered=self.lowered)
    return flops and flops / self.args.batch_size

  def run(self, batch=None):
    # The compiled executable itself: calling the jitted function would compile again.
    self.state, metrics = self.compiled(self.state, self.batch if batch is None else batch)
    return metrics["loss"]


class ForwardBench:
  """The eval forward as the Evaluator runs it (the model without stochastic depth, on
  uint8 images scaled on the device)."""

  def __init__(self, args):
    self.args = args
    setup = state.Setup(run_config(args), args.num_classes)
    self.num_params = setup.num_params
    self.forward = jax.jit(_forward(setup.eval_model))
    self.params = models.init_params(setup.eval_model, args.image_size)  # No optimiser state.
    self.images = random_batch(args)["image"]
    self.lowered = self.forward.lower(self.params, self.images)
    self.compiled = self.lowered.compile()

  def flops_per_image(self) -> Optional[float]:
    flops = program_flops(self.forward, self.params, self.images, lowered=self.lowered)
    return flops and flops / self.args.batch_size

  def run(self):
    return self.compiled(self.params, self.images)


# ---------------------------------------------------------------------- modes
def bench_step(args, result):
  """--mode=train or eval: the step alone, on one device-resident batch."""
  bench = TrainBench(args) if args.mode == "train" else ForwardBench(args)
  result["num_params"] = bench.num_params
  times = time_steps(bench.run, args.warmup, args.steps)
  result["timed_steps"], result["step_time_s"] = len(times), statistics.median(times)
  result["images_per_s"] = args.batch_size / result["step_time_s"]
  key = "train_flops_per_image" if args.mode == "train" else "forward_flops_per_image"
  result[key] = result["flops_per_image"] = bench.flops_per_image()
  if args.mode == "train":  # The forward too: lowered only, nothing compiles or runs.
    forward = jax.jit(_forward(bench.setup.eval_model))
    flops = program_flops(forward, bench.state["params"], bench.batch["image"])
    result["forward_flops_per_image"] = flops and flops / args.batch_size


class InMemoryJpegs:
  """A source for input_pipeline.train_dataset: generated JPEGs held in memory. Smooth
  random colour fields with fine noise at quality 90, so that size and decode cost
  resemble photographs' (flat images decode too fast, pure noise too slowly)."""

  def __init__(self, count: int, num_classes: int, width: int = 500, height: int = 375):
    import tensorflow as tf
    rng = np.random.default_rng(0)
    self.encoded = []
    for _ in range(count):
      coarse = rng.uniform(0, 255, (1, max(height // 40, 2), max(width // 40, 2), 3))
      smooth = tf.image.resize(coarse.astype(np.float32), (height, width), method="bicubic")[0]
      image = np.clip(smooth.numpy() + rng.normal(0, 12, (height, width, 3)), 0, 255)
      self.encoded.append(tf.io.encode_jpeg(image.astype(np.uint8), quality=90).numpy())
    self.labels = rng.integers(0, num_classes, count).astype(np.int64)
    self.mean_jpeg_bytes = float(np.mean([len(e) for e in self.encoded]))
    self.name = "generated_jpegs"

  def examples(self, split, in_memory):
    from mixer_jax import input_pipeline
    return input_pipeline.InMemoryExamples(self.encoded, self.labels)


def _train_batches(args, result, randaugment_on: str, source=None,
                   host_scaling: bool = False):
  """An iterator over input_pipeline.train_dataset's batches of generated JPEGs, the
  recipe's flip and RandAugment on the host ("host") or left to the device ("device");
  uint8, or float32 scaled on the host with `host_scaling` (the former path)."""
  import tensorflow as tf
  from mixer_jax import input_pipeline
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerator is JAX's.
  source = source or InMemoryJpegs(args.num_source_images, args.num_classes)
  config = types.SimpleNamespace(seed=0, image_size=args.image_size, train_split="train",
                                 cache_train=True, randaugment_on=randaugment_on,
                                 **IMAGENET1K_AUGMENT)
  result["mean_jpeg_bytes"] = source.mean_jpeg_bytes
  result["augmentation"] = IMAGENET1K_AUGMENT
  return iter(input_pipeline.train_dataset(source, config, args.batch_size,
                                           args.num_classes, 0, 1,
                                           host_scaling=host_scaling))


def bench_input(args, result):
  """The tf.data pipeline alone: decode, Inception crop, [flip, RandAugment,] batch;
  with --randaugment_on=both the host and device paths in alternating windows."""
  from mixer_jax import input_pipeline
  places = ("host", "device") if args.randaugment_on == "both" else (args.randaugment_on,)
  source = InMemoryJpegs(args.num_source_images, args.num_classes)
  # "host" is the path as it was: float32 out, scaled on the host.
  batches = {p: _train_batches(args, result, p, source, host_scaling=p == "host")
             for p in places}
  shipped = {}

  def fetch(place):
    image = np.asarray(next(batches[place])["image"])
    shipped[place] = image.nbytes // image.shape[0]
    return image

  for place in places:
    time_steps(lambda: fetch(place), args.warmup, 0)
  windows = {p: [] for p in places}
  for _ in range(args.rounds if len(places) > 1 else 1):
    for place in places:
      # What the pipeline prefetched during the other window is used up untimed.
      if len(places) > 1:
        time_steps(lambda: fetch(place), input_pipeline.PREFETCH_BATCHES + 1, 0)
      windows[place].append(time_steps(lambda: fetch(place), 0, args.steps))
  cores = result["device"]["cores"]
  for place in places:
    # Over whole windows (prefetching makes single batches bursty), the best window.
    rates = [args.batch_size * len(t) / sum(t) for t in windows[place]]
    result[f"{place}_images_per_s_per_core"] = max(rates) / cores
    result[f"{place}_rounds_images_per_s"] = rates
    result[f"{place}_bytes_per_image"] = shipped[place]
  headline = places[-1]  # "device" where both ran: the default on accelerators.
  times = max(windows[headline], key=lambda t: len(t) / sum(t))
  result["timed_steps"], result["step_time_s"] = len(times), statistics.median(times)
  result["images_per_s"] = args.batch_size * len(times) / sum(times)
  result["images_per_s_per_core"] = result["images_per_s"] / cores
  if len(places) > 1:
    result["device_vs_host_ratio"] = (result["device_images_per_s_per_core"] /
                                      result["host_images_per_s_per_core"])


def bench_end_to_end(args, result):
  """The input pipeline feeding the train step as main's loop does, against the bare
  step (a device-resident batch) in the same run, both over whole windows."""
  from mixer_jax import input_pipeline  # TensorFlow: see the imports
  bench = TrainBench(args)
  result["num_params"] = bench.num_params
  mesh = sharding.make_mesh(1)
  batches = _train_batches(args, result, bench.setup.config.randaugment_on)

  def fed_step():
    return bench.run(sharding.global_batch(input_pipeline.to_numpy(next(batches)), mesh))

  def window(step) -> float:
    start = time.perf_counter()
    jax.block_until_ready([step() for _ in range(args.steps)])  # No sync inside: as main.
    return time.perf_counter() - start

  # Fed warm-up first (it fills the pipeline); then bare and fed windows alternate, so
  # that a slow spell of a shared machine falls on both.
  time_steps(fed_step, args.warmup, 0)
  time_steps(bench.run, args.warmup, 0)
  bare = fed = 0.0
  for _ in range(args.rounds):
    bare += window(bench.run)
    # The pipeline prefetched during the bare window: use that head start up untimed.
    time_steps(fed_step, input_pipeline.PREFETCH_BATCHES, 0)
    fed += window(fed_step)
  images = args.batch_size * args.steps * args.rounds
  result["train_images_per_s"] = images / bare
  result["images_per_s"] = result["end_to_end_images_per_s"] = images / fed
  result["end_to_end_ratio"] = bare / fed
  result["step_time_s"] = args.batch_size / result["images_per_s"]
  result["train_flops_per_image"] = result["flops_per_image"] = bench.flops_per_image()


def run(args) -> Dict[str, Any]:
  """Runs one benchmark; returns the JSON-ready result."""
  result: Dict[str, Any] = {
      "mode": args.mode, "variant": args.variant, "batch_size": args.batch_size,
      "image_size": args.image_size, "dtype": args.dtype,
      "remat_policy": args.remat_policy, "scan": args.scan,
      "mixup_alpha": args.mixup_alpha, "stoch_depth": args.stoch_depth,
      "model_overrides": model_overrides(args), "warmup": args.warmup,
      "randaugment_on": args.randaugment_on,
      "device": device_description(with_jax=args.mode != "input")}
  peak_size = args.peak_size
  if peak_size is None:  # A 2048 matmul is over too soon (0.2 ms) to reach an H100's peak.
    peak_size = 2048 if result["device"].get("platform") == "cpu" else 8192
  with_peak = args.mode != "input" and peak_size
  before = measure_peak(args.dtype, peak_size) if with_peak else None
  {"train": bench_step, "eval": bench_step, "input": bench_input,
   "end_to_end": bench_end_to_end}[args.mode](args, result)
  if with_peak:  # The higher of before and after: a drifting machine cannot flatter us.
    result.update(max(before, measure_peak(args.dtype, peak_size),
                      key=lambda r: r["peak_matmul_flops"]))
  result["loadavg_1min"] = os.getloadavg()[0]
  # Peak resident host memory (Linux reports KiB): what keeping freed memory costs.
  result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if result.get("flops_per_image"):
    result["achieved_flops"] = result["flops_per_image"] * result["images_per_s"]
    if result.get("peak_matmul_flops"):
      result["utilisation_vs_matmul"] = result["achieved_flops"] / result["peak_matmul_flops"]
    peak = datasheet_peak(result["device"]["device_kind"], args.dtype)
    result["datasheet_peak_flops"] = peak
    result["mfu"] = result["achieved_flops"] / peak if peak else None
  return result


def report(r: Dict[str, Any]) -> str:
  """One line for people, then the JSON line."""
  figures = [f"{r['images_per_s']:.2f} img/s", f"{r['step_time_s'] * 1e3:.1f} ms per step"]
  figures += [f"{100 * r[key]:.1f}% {label}" for key, label in (
      ("utilisation_vs_matmul", "of the matmul peak"), ("mfu", "MFU")) if r.get(key)]
  device = r["device"].get("device_kind", r["device"]["cpu"])
  return (f"{r['mode']} {r['variant']} batch {r['batch_size']} {r['dtype']} on {device}: "
          f"{', '.join(figures)}\n{json.dumps(r, sort_keys=True)}")


def main(argv=None) -> int:
  host_memory.keep_freed_memory()  # First, before JAX starts its threads.
  try:
    print(report(run(parse_args(argv))), flush=True)
  except ValueError as e:  # ConfigError and the model's own shape/name errors.
    print(f"Error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
