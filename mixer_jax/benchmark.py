r"""Throughput of the Mixer train step, eval forward and input pipeline on this machine.

  python -m mixer_jax.benchmark --variant=S/32 --batch_size=32 --mode=train
  python -m mixer_jax.benchmark --variant=S/32 --batch_size=32 --mode=eval --dtype=bfloat16
  python -m mixer_jax.benchmark --mode=input                  # tf.data alone, images/s per core
  python -m mixer_jax.benchmark --mode=end_to_end             # tf.data feeding the train step

Every timed figure is the median over `--steps` repeated steps after `--warmup` untimed
ones (compilation included in the warm-up). The train step is the one `main` runs
(steps.make_train_step: forward, backward, clip by global norm, Adam with decoupled
weight decay, with mixup / stochastic depth when asked), jitted with the state donated.
FLOPs come from XLA's own cost analysis of the compiled programs (a multiply-add counts
2). Utilisation is measured against a large matmul of the same dtype timed in the same
run (`peak_matmul_flops`), and on known accelerators also against the datasheet peak
(MFU). The last stdout line is one JSON object with every figure.

The train and eval modes import no TensorFlow, tfds, ml_collections or clu, so they run
on machines that have only jax, flax and optax; `input` and `end_to_end` need
TensorFlow (the real input pipeline of input_pipeline.py).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable, Dict, List, Optional

MODES = ("train", "eval", "input", "end_to_end")
DTYPES = ("float32", "bfloat16")

# Datasheet dense matmul peaks per device (FLOP/s), by a substring of jax's
# `device_kind`; the first match wins. float32 on NVIDIA GPUs is the TF32 tensor-core
# peak, since XLA's default precision runs float32 dots in TF32 there; on TPUs float32
# dots run as bfloat16 passes by default, so both share the bfloat16 peak.
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


class BenchmarkError(ValueError):
  """A benchmark flag that cannot work."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One sentence through BenchmarkError, not argparse's exit.
    raise BenchmarkError(f"{message[0].upper()}{message[1:]}; see --help.")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m mixer_jax.benchmark",
              description=__doc__.split("\n\n")[0].strip())
  p.add_argument("--mode", default="train", help=f"One of {', '.join(MODES)}.")
  p.add_argument("--variant", default="S/32", help="Mixer variant, e.g. S/32, B/16.")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--dtype", default="float32", help=f"Compute dtype: {', '.join(DTYPES)}.")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--steps", type=int, default=20, help="Timed steps (the median is reported).")
  p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compiles).")
  p.add_argument("--remat", action="store_true", help="Rematerialise each block (config.model.remat).")
  p.add_argument("--mixup_alpha", type=float, default=0.0,
                 help="Mixup inside the train step (the ImageNet-1k recipe uses 0.5).")
  p.add_argument("--stoch_depth", type=float, default=0.0,
                 help="Stochastic depth of the last block (the ImageNet-1k recipe uses 0.1).")
  p.add_argument("--weight_decay", type=float, default=0.1)
  for name in ("num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
    p.add_argument(f"--{name}", type=int, default=0,
                   help="Override of the variant's value (0 = the variant's); for tiny runs.")
  p.add_argument("--peak_size", type=int, default=None,
                 help="Side of the square matmul timed as this machine's peak (0 = skip; "
                      "default 2048 on CPUs, 8192 on accelerators).")
  p.add_argument("--source_size", default="500x375",
                 help="WIDTHxHEIGHT of the generated JPEGs (input modes; ImageNet's typical size).")
  p.add_argument("--num_source_images", type=int, default=64,
                 help="Distinct generated JPEGs the input modes cycle through.")
  p.add_argument("--rounds", type=int, default=2,
                 help="end_to_end: alternating (bare, fed) window pairs, --steps each.")
  p.add_argument("--with_train_step", action="store_true",
                 help="With --mode=input: the same as --mode=end_to_end.")
  p.add_argument("--traceback", action="store_true", help="Full tracebacks for user errors.")
  return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  """Flags -> validated namespace; a bad value raises BenchmarkError (one sentence)."""
  args = _parser().parse_args(argv)
  if args.mode not in MODES:
    raise BenchmarkError(f"--mode={args.mode!r} is not one of {', '.join(MODES)}.")
  if args.mode == "input" and args.with_train_step:
    args.mode = "end_to_end"
  if args.dtype not in DTYPES:
    raise BenchmarkError(f"--dtype={args.dtype!r} is not one of {', '.join(DTYPES)}.")
  for name in ("batch_size", "image_size", "steps", "rounds", "num_classes",
               "num_source_images"):
    if getattr(args, name) <= 0:
      raise BenchmarkError(f"--{name}={getattr(args, name)} must be a positive integer.")
  for name in ("warmup", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
    if getattr(args, name) < 0:
      raise BenchmarkError(f"--{name}={getattr(args, name)} must be zero or positive.")
  if args.peak_size is not None and args.peak_size < 0:  # None: the platform's default.
    raise BenchmarkError(f"--peak_size={args.peak_size} must be zero or positive.")
  if args.mode == "end_to_end" and args.warmup < 1:
    raise BenchmarkError("--warmup must be at least 1 with --mode=end_to_end (the first "
                         "step compiles and fills the input pipeline).")
  if args.mixup_alpha < 0 or args.weight_decay < 0:
    raise BenchmarkError("--mixup_alpha and --weight_decay must be zero or positive.")
  if not 0 <= args.stoch_depth < 1:
    raise BenchmarkError(f"--stoch_depth={args.stoch_depth} must be in [0, 1).")
  try:
    w, h = (int(v) for v in args.source_size.lower().split("x"))
    if w <= 0 or h <= 0:
      raise ValueError
  except ValueError:
    raise BenchmarkError(f"--source_size={args.source_size!r} must be WIDTHxHEIGHT in "
                         "pixels, e.g. 500x375.") from None
  args.source_wh = (w, h)
  # The model is checked now (variant name, patch divisibility), before anything compiles.
  from mixer_jax import models
  spec = models.parse_variant(args.variant)
  patch = spec.patch_size
  if args.image_size % patch:
    raise BenchmarkError(f"--image_size={args.image_size} is not divisible by the patch "
                         f"size {patch} of {args.variant}; use a multiple of {patch}.")
  return args


# ------------------------------------------------------------------ the machine
def cpu_description() -> Dict[str, Any]:
  """Model name, usable cores and the vector extensions that matter for matmuls."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine()):
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
  return {"cpu": model, "cores": cores, "cpu_flags": [f for f in wanted if f in flags]}


def device_description() -> Dict[str, Any]:
  import jax
  dev = jax.devices()[0]
  out = {"platform": dev.platform, "device_kind": dev.device_kind,
         "device_count": jax.device_count(), "jax": jax.__version__}
  out.update(cpu_description())
  out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  from mixer_jax import host_memory
  out["keep_host_memory"] = host_memory.applied()
  return out


def datasheet_peak(device_kind: str, dtype: str) -> Optional[float]:
  for key, peaks in DATASHEET_PEAKS:
    if key.lower() in device_kind.lower():
      return peaks[dtype]
  return None


# ----------------------------------------------------------------------- timing
def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def _rusage():
  """This process's resource usage, or None where the `resource` module is missing."""
  try:
    import resource
  except ImportError:  # Not a Unix.
    return None
  return resource.getrusage(resource.RUSAGE_SELF)


def _page_faults() -> int:
  usage = _rusage()
  return usage.ru_minflt if usage else 0


class CpuMeter:
  """CPU seconds this process used per wall second: `busy_cores`.

  Near the core count, the timed code had the machine to itself; well below it, other
  processes took cores away (or the code did not use them all), and the wall-clock
  figures understate this code's speed. Reported so a reader can tell which.
  Also counts the minor page faults in the window (`page_faults`): thousands per step
  mean memory is being mapped afresh every step (see host_memory.py).
  """

  def __enter__(self):
    self._cpu, self._wall = _cpu_seconds(), time.perf_counter()
    self._faults = _page_faults()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._wall
    self.cpu_seconds = _cpu_seconds() - self._cpu
    self.busy_cores = self.cpu_seconds / max(self.seconds, 1e-9)
    self.page_faults = _page_faults() - self._faults


def time_steps(step: Callable[[], Any], warmup: int, steps: int,
               meter: Optional[Dict[str, float]] = None) -> List[float]:
  """Seconds of each of `steps` calls after `warmup` untimed ones.

  `step` must return something to block on; blocking each step is what makes a step's
  time its own (JAX dispatches asynchronously). `meter`, if given, receives the
  timed window's `busy_cores` and `page_faults_per_step` (see CpuMeter).
  """
  import jax
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  with CpuMeter() as cpu:
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(step())
      times.append(time.perf_counter() - start)
  if meter is not None:
    meter["busy_cores"] = cpu.busy_cores
    meter["page_faults_per_step"] = cpu.page_faults / steps
  return times


def summarize_times(times: List[float], images_per_step: int) -> Dict[str, float]:
  median = statistics.median(times)
  return {"step_time_s": median, "step_time_min_s": min(times),
          "step_time_max_s": max(times), "images_per_s": images_per_step / median,
          "timed_steps": len(times)}


def matmul_flops(jaxpr) -> float:
  """2 x the multiply-adds of every dot_general in a (closed) jaxpr, nested ones included.

  Of a `cond`'s branches (e.g. lax.platform_dependent's) only the costliest counts:
  one of them runs. A scan's body counts once per iteration. Equations whose results
  nothing uses are left out, as XLA removes them (the stem's custom VJP computes an
  image gradient that the train step never reads).
  """
  from jax.extend.core import Literal
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
  used = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      used.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, Literal))
  total = 0.0
  for eqn in reversed(used):
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[d] for d in lhs_contract)
    elif eqn.primitive.name == "cond":
      total += max(matmul_flops(branch) for branch in eqn.params["branches"])
    else:
      repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (list, tuple)) else (value,)):
          if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
            total += repeat * matmul_flops(sub)
  return total


def program_flops(jitted, *args, lowered=None) -> float:
  """FLOPs of one call of `jitted(*args)`, from XLA's cost analysis before optimisation.

  Why not the compiled program's: after optimisation XLA on GPU turns the matmuls into
  library calls (cuBLAS, Triton) that its cost analysis does not count (a B/16 train
  step read 4.7 instead of 76 GFLOP per image on an H100). Before optimisation the count
  is the model's (on CPU within 0.1 % of the compiled one). Backends that cannot
  analyse a lowered program (GPU plugins, jax 0.11) get `matmul_flops` of its jaxpr
  instead: the matmuls alone, on CPU 1.9 % (S/32 train step) and
  1.2 % (forward) below XLA's count, which includes element-wise work. `lowered`:
  `jitted.lower(*args)` where the caller already has it.
  """
  import jax
  try:
    cost = (lowered or jitted.lower(*args)).cost_analysis()
  except NotImplementedError:
    cost = None
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    return float(cost["flops"])
  return matmul_flops(jax.make_jaxpr(jitted)(*args))


def measure_peak(dtype: str, size: int, repeats: int = 5) -> Dict[str, float]:
  """FLOP/s of a `size` x `size` matmul in `dtype`: this machine's practical peak."""
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32).astype(dt)
  matmul = jax.jit(jnp.matmul)
  times = time_steps(lambda: matmul(a, b), warmup=2, steps=repeats)
  median = statistics.median(times)
  return {"peak_matmul_size": size, "peak_matmul_s": median,
          "peak_matmul_flops": 2.0 * size ** 3 / median}


# ------------------------------------------------------------------- the model
def model_overrides(args) -> Dict[str, int]:
  return {k: getattr(args, k) for k in ("num_blocks", "hidden_dim", "tokens_mlp_dim",
                                        "channels_mlp_dim") if getattr(args, k)}


def step_config(args) -> types.SimpleNamespace:
  """The few config fields steps.make_train_step reads, as a plain attribute object."""
  return types.SimpleNamespace(seed=0, label_smoothing=0.0, mixup_alpha=args.mixup_alpha,
                               loss="softmax", grad_accum_steps=1, nonfinite="stop")


class TrainBench:
  """The train step as main builds it: model + AdamW chain + steps.make_train_step."""

  def __init__(self, args):
    import jax
    import jax.numpy as jnp
    from mixer_jax import models, optim, steps
    self.args = args
    self.model = models.create_model(args.variant, args.num_classes, **model_overrides(args),
                                     stoch_depth=args.stoch_depth, dtype=args.dtype,
                                     remat=args.remat)
    schedule = optim.learning_rate_schedule(1e-3, 10_000, 100, "linear")
    self.tx = optim.make_optimizer(name="adam", schedule=schedule,
                                   weight_decay=args.weight_decay, grad_clip_norm=1.0)
    model, tx, size = self.model, self.tx, args.image_size

    def init_state(rng):
      params = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)["params"]
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    self.state = jax.jit(init_state)(jax.random.key(0))
    self.num_params = models.count_params(self.state["params"])
    self.step = jax.jit(steps.make_train_step(model, tx, step_config(args), args.num_classes),
                        donate_argnums=(0,))
    self.batch = random_batch(args)
    self.lowered = self.step.lower(self.state, self.batch)
    self.compiled = self.lowered.compile()

  def flops_per_image(self) -> float:
    return program_flops(self.step, self.state, self.batch,
                         lowered=self.lowered) / self.args.batch_size

  def run(self, batch=None):
    # The compiled executable itself: calling the jitted function would compile again.
    self.state, metrics = self.compiled(self.state, self.batch if batch is None else batch)
    return metrics["loss"]


def random_batch(args):
  import jax
  import jax.numpy as jnp
  k1, k2 = jax.random.split(jax.random.key(3))
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  return {"image": jax.random.uniform(k1, shape, jnp.float32, -1.0, 1.0),
          "label": jax.random.randint(k2, (args.batch_size,), 0, args.num_classes)}


def forward_program(args):
  """(jitted forward, params, images): the eval forward as Evaluator runs it."""
  import jax
  from mixer_jax import models
  model = models.create_model(args.variant, args.num_classes, **model_overrides(args),
                              dtype=args.dtype)
  params = models.init_params(model, args.image_size)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  return forward, params, random_batch(args)["image"]


class ForwardBench:
  """forward_program's eval forward, compiled once for its batch (TrainBench's twin)."""

  def __init__(self, args):
    from mixer_jax import models
    self.args = args
    self.forward, self.params, self.images = forward_program(args)
    self.num_params = models.count_params(self.params)
    self.lowered = self.forward.lower(self.params, self.images)
    self.compiled = self.lowered.compile()

  def flops_per_image(self) -> float:
    return program_flops(self.forward, self.params, self.images,
                         lowered=self.lowered) / self.args.batch_size

  def run(self):
    return self.compiled(self.params, self.images)


def step_program(args):
  """(one step of --mode=train or eval as a zero-argument call, its compiled program)."""
  bench = TrainBench(args) if args.mode == "train" else ForwardBench(args)
  return bench.run, bench.compiled


# ---------------------------------------------------------------------- modes
def bench_eval(args, result):
  bench = ForwardBench(args)
  times = time_steps(bench.run, args.warmup, args.steps, result)
  result.update(summarize_times(times, args.batch_size))
  result["forward_flops_per_image"] = bench.flops_per_image()
  result["flops_per_image"] = result["forward_flops_per_image"]


def bench_train(args, result):
  bench = TrainBench(args)
  result["num_params"] = bench.num_params
  times = time_steps(bench.run, args.warmup, args.steps, result)
  result.update(summarize_times(times, args.batch_size))
  result["train_flops_per_image"] = bench.flops_per_image()
  result["flops_per_image"] = result["train_flops_per_image"]
  # Lowered only: nothing to run or compile.
  result["forward_flops_per_image"] = program_flops(*forward_program(args)) / args.batch_size


def input_config(args) -> types.SimpleNamespace:
  """The input_pipeline fields for the ImageNet-1k recipe's training augmentation."""
  return types.SimpleNamespace(seed=0, image_size=args.image_size, train_split="train",
                               cache_train=False, shuffle_buffer=args.num_source_images,
                               **IMAGENET1K_AUGMENT)


class InMemoryJpegs:
  """A source for input_pipeline.train_dataset: generated JPEGs held in memory.

  The images are smooth random colour fields with fine noise, encoded at quality 90,
  so their size and decode cost resemble photographs (flat images would decode
  unrealistically fast, pure noise unrealistically slowly).
  """

  def __init__(self, count: int, width: int, height: int, num_classes: int):
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
      coarse = rng.uniform(0, 255, (1, max(height // 40, 2), max(width // 40, 2), 3))
      smooth = tf.image.resize(coarse.astype(np.float32), (height, width), method="bicubic")[0]
      image = np.clip(smooth.numpy() + rng.normal(0, 12, (height, width, 3)), 0, 255)
      encoded.append(tf.io.encode_jpeg(image.astype(np.uint8), quality=90).numpy())
    self.encoded = encoded
    self.labels = rng.integers(0, num_classes, count).astype(np.int64)
    self.mean_jpeg_bytes = float(np.mean([len(e) for e in encoded]))
    self.name = "generated_jpegs"

  def read(self, split, index, count):
    import tensorflow as tf
    return tf.data.Dataset.from_tensor_slices({"image": self.encoded, "label": self.labels})


def _train_iterator(args):
  import tensorflow as tf
  from mixer_jax import input_pipeline
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerator is JAX's.
  w, h = args.source_wh
  source = InMemoryJpegs(args.num_source_images, w, h, args.num_classes)
  ds = input_pipeline.train_dataset(source, input_config(args), args.batch_size,
                                    args.num_classes, 0, 1)
  return iter(ds), source


def bench_input(args, result):
  """The tf.data pipeline alone: decode, Inception crop, flip, RandAugment, batch."""
  import numpy as np
  iterator, source = _train_iterator(args)
  for _ in range(args.warmup):
    next(iterator)
  times = []
  with CpuMeter() as cpu:
    for _ in range(args.steps):
      start = time.perf_counter()
      batch = next(iterator)
      np.asarray(batch["image"])
      times.append(time.perf_counter() - start)
  result["busy_cores"] = cpu.busy_cores
  result.update(summarize_times(times, args.batch_size))
  # Throughput over the whole timed window too: prefetching makes single batches bursty.
  result["images_per_s_window"] = args.batch_size * len(times) / sum(times)
  result["images_per_s_per_core"] = result["images_per_s_window"] / result["device"]["cores"]
  result["mean_jpeg_bytes"] = source.mean_jpeg_bytes
  result["augmentation"] = dict(IMAGENET1K_AUGMENT, source_size=args.source_size)


def bench_end_to_end(args, result):
  """The real input pipeline feeding the train step as main's loop does, against the
  bare train step (device-resident batch) in the same run; both over whole windows."""
  import jax
  from mixer_jax import input_pipeline, sharding
  bench = TrainBench(args)
  result["num_params"] = bench.num_params
  mesh = sharding.make_mesh(1)
  iterator, source = _train_iterator(args)

  def fed_step():
    batch = sharding.global_batch(input_pipeline.to_numpy(next(iterator)), mesh)
    return bench.run(batch)

  seconds = {"train": [], "end_to_end": []}
  cpu_seconds = {"train": 0.0, "end_to_end": 0.0}
  page_faults = {"train": 0, "end_to_end": 0}

  def window(step, name):
    with CpuMeter() as cpu:
      out = [step() for _ in range(args.steps)]  # No host sync inside, like main's loop.
      jax.block_until_ready(out)
    seconds[name].append(cpu.seconds)
    cpu_seconds[name] += cpu.cpu_seconds
    page_faults[name] += cpu.page_faults

  # The fed steps' warm-up comes first: it fills the input pipeline and lets the malloc
  # heap, shared with tf.data's threads, settle before any window is timed. Then bare
  # and fed windows alternate, so that a slow spell of this shared machine falls on both.
  for _ in range(args.warmup):
    jax.block_until_ready(fed_step())
  for _ in range(args.warmup):
    jax.block_until_ready(bench.run())
  for _ in range(args.rounds):
    window(bench.run, "train")
    # The pipeline prefetched during the bare window; consume that head start untimed
    # so the fed window runs at the pipeline's steady rate.
    for _ in range(input_pipeline.PREFETCH_BATCHES):
      jax.block_until_ready(fed_step())
    window(fed_step, "end_to_end")
  for name in seconds:
    result[f"{name}_busy_cores"] = cpu_seconds[name] / sum(seconds[name])
    result[f"{name}_page_faults_per_step"] = page_faults[name] / (args.steps * args.rounds)
  bare, fed = (args.batch_size * args.steps * args.rounds / sum(seconds[name])
               for name in ("train", "end_to_end"))
  result["end_to_end_round_ratios"] = [t / f for t, f in zip(seconds["train"], seconds["end_to_end"])]
  result["train_images_per_s"] = bare
  result["end_to_end_images_per_s"] = fed
  result["images_per_s"] = fed
  result["end_to_end_ratio"] = fed / bare
  result["step_time_s"] = args.batch_size / fed
  result["train_flops_per_image"] = bench.flops_per_image()
  result["flops_per_image"] = result["train_flops_per_image"]
  result["mean_jpeg_bytes"] = source.mean_jpeg_bytes
  result["augmentation"] = dict(IMAGENET1K_AUGMENT, source_size=args.source_size)


def run(args) -> Dict[str, Any]:
  """Runs one benchmark; returns the JSON-ready result."""
  result: Dict[str, Any] = {
      "mode": args.mode, "variant": args.variant, "batch_size": args.batch_size,
      "image_size": args.image_size, "dtype": args.dtype, "remat": args.remat,
      "mixup_alpha": args.mixup_alpha, "stoch_depth": args.stoch_depth,
      "model_overrides": model_overrides(args), "warmup": args.warmup,
      "device": device_description() if args.mode != "input" else cpu_description()}
  peak_size = args.peak_size
  if peak_size is None:
    # A 2048 matmul keeps an H100 busy for 0.2 ms, too short to reach its peak.
    peak_size = 2048 if result["device"].get("platform", "cpu") == "cpu" else 8192
  with_peak = args.mode in ("train", "eval", "end_to_end") and peak_size
  if with_peak:
    before = measure_peak(args.dtype, peak_size)
  {"train": bench_train, "eval": bench_eval, "input": bench_input,
   "end_to_end": bench_end_to_end}[args.mode](args, result)
  if with_peak:
    # Timed before and after the model; the higher is the peak, so that a machine whose
    # speed drifted during the run cannot flatter the utilisation.
    after = measure_peak(args.dtype, peak_size)
    result.update(max(before, after, key=lambda r: r["peak_matmul_flops"]))
    result["peak_matmul_flops_before_after"] = [before["peak_matmul_flops"],
                                                after["peak_matmul_flops"]]
  result["loadavg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  usage = _rusage()
  if usage:  # Peak resident host memory of this process (Linux reports KiB).
    result["max_rss_mb"] = usage.ru_maxrss / 1024
  flops = result.get("flops_per_image")
  if flops is not None and args.mode != "input":
    result["achieved_flops"] = flops * result["images_per_s"]
    if result.get("peak_matmul_flops"):
      result["utilisation_vs_matmul"] = result["achieved_flops"] / result["peak_matmul_flops"]
    peak = datasheet_peak(result["device"]["device_kind"], args.dtype)
    result["datasheet_peak_flops"] = peak
    result["mfu"] = result["achieved_flops"] / peak if peak else None
  return result


def report(result: Dict[str, Any]) -> str:
  """Human-readable lines, then the JSON line."""
  lines = [f"mode={result['mode']} variant={result['variant']} batch={result['batch_size']} "
           f"image={result['image_size']} dtype={result['dtype']} on "
           f"{result['device'].get('device_kind', 'cpu')} ({result['device']['cpu']}, "
           f"{result['device']['cores']} cores)"]

  def add(label, key, fmt):
    if result.get(key) is not None:
      lines.append(f"  {label:<28}{fmt(result[key])}")

  g = lambda x: f"{x / 1e9:.2f} GFLOP"
  add("images/s", "images_per_s", lambda x: f"{x:.2f}")
  add("images/s per core", "images_per_s_per_core", lambda x: f"{x:.2f}")
  add("step time (median)", "step_time_s", lambda x: f"{x * 1e3:.1f} ms")
  add("bare train step images/s", "train_images_per_s", lambda x: f"{x:.2f}")
  add("end to end / bare step", "end_to_end_ratio", lambda x: f"{x:.3f}")
  add("forward FLOPs per image", "forward_flops_per_image", g)
  add("train FLOPs per image", "train_flops_per_image", g)
  add("achieved FLOP/s", "achieved_flops", lambda x: f"{x / 1e9:.1f} GFLOP/s")
  add("matmul peak (same run)", "peak_matmul_flops", lambda x: f"{x / 1e9:.1f} GFLOP/s")
  add("utilisation vs matmul", "utilisation_vs_matmul", lambda x: f"{100 * x:.1f}%")
  add("MFU (datasheet)", "mfu", lambda x: f"{100 * x:.1f}%")
  add("busy cores (timed window)", "busy_cores", lambda x: f"{x:.2f}")
  add("page faults per step", "page_faults_per_step", lambda x: f"{x:,.0f}")
  add("peak host memory (RSS)", "max_rss_mb", lambda x: f"{x:,.0f} MB")
  add("1-min load average", "loadavg_1min", lambda x: f"{x:.2f}")
  lines.append(json.dumps(result, sort_keys=True))
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  show_traceback = "--traceback" in argv
  argv = [a for a in argv if a != "--traceback"]
  try:
    args = parse_args(argv)
    print(report(run(args)), flush=True)
  except ValueError as e:  # BenchmarkError and the model's own shape/name errors.
    if show_traceback:
      raise
    print(f"Error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
