r"""kernels="pallas" against kernels="xla" on a GPU, in one process (issue 21).

  pip install --no-deps -e .    # once, where mixer_jax is not installed yet
  python benchmarks/gpu_pallas.py --out=$OUT [--budget=420]
  python benchmarks/gpu_pallas.py --dry_run     # any machine: tiny shapes, the flow only

Stages, in this order, each skipped (and said so) when fewer seconds are left than it
needs; every result is one JSON line on stdout and in OUT/pallas.jsonl as it comes:
  1. check    each kernel against its plain form on the B/16 shapes, on this GPU
              (largest difference relative to the largest value), and whether the
              kernels compile here at all (if not, kernels="pallas" runs the plain ops).
  2. kernels  per-kernel times, Pallas against the plain form jitted by XLA, on the
              B/16 bf16 batch-256 shapes: LayerNorm forward and forward+backward on
              (50176, 768); channel MLP (50176 x 768 -> 3072 -> 768) and token MLP
              (196608 x 196 -> 384 -> 196) forward and forward+backward, and each matmul
              kernel alone (dense_gelu; gelu_grad_matmul) with its TFLOP/s.
  3. train    Mixer-B/16, 224 px, batch 256, bfloat16: the train step main runs
              (mixer_jax.tools.benchmark.TrainBench), "xla" and "pallas" timed in alternating
              windows; img/s, ms per step, MFU against the datasheet (989 TFLOP/s for
              H100 SXM and H200) and against this run's 8192^3 bf16 matmul.
  4. eval     the B/16 eval forward (ForwardBench), alike.
  5. sweep    tile sizes of the two matmul kernels on the B/16 shapes.
  6. S/16 and L/16, train then eval, alike.
MFU counts the model's FLOPs (XLA's cost analysis of the "xla" step, which cannot cost
a Pallas kernel; the same model math either way). Imports no TensorFlow, tfds,
ml_collections or clu.
"""

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time

# Programs compiled once are reused by a rerun (the same program, same flags).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/mixer_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The repository root, where mixer_jax is not installed (a script folder is sys.path[0]).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixer_jax import host_memory  # noqa: E402
from mixer_jax.tools import benchmark  # noqa: E402

# Pallas's Triton kernels in a lowered program (jaxlib <= 0.10.2, and later).
_TRITON_CALL = re.compile(r"xla\.gpu\.triton|triton_kernel_call")
# Seconds a stage needs to be started (compiles included), on an H100-class GPU.
NEEDS = {"check": 30, "kernels": 60, "train": 120, "eval": 60, "sweep": 60, "S/16": 90,
         "L/16": 150}
SWEEP = [dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3),
         dict(block_m=128, block_n=128, block_k=32, num_warps=4, num_stages=4),
         dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
         dict(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
         dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)]


def _parser():
  p = argparse.ArgumentParser(prog="benchmarks/gpu_pallas.py", description=__doc__.split("\n")[0])
  p.add_argument("--out", default="", help="Folder for pallas.jsonl and pallas.txt.")
  p.add_argument("--budget", type=int, default=420, help="Seconds for all stages.")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20, help="Timed steps per window.")
  p.add_argument("--windows", type=int, default=2, help="Alternating windows per kind.")
  p.add_argument("--stages", default="check,kernels,train,eval,sweep,S/16,L/16")
  p.add_argument("--dry_run", action="store_true",
                 help="Tiny shapes, interpret-mode kernels: checks the flow on any machine.")
  return p


class Run:
  """Stages against a deadline; each result printed and appended to OUT/pallas.jsonl."""

  def __init__(self, args):
    self.args, self.start = args, time.time()
    self.files = []
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      self.files = [open(os.path.join(args.out, n), "a") for n in ("pallas.jsonl", "pallas.txt")]

  def left(self) -> float:
    return self.args.budget - (time.time() - self.start)

  def say(self, text: str):
    print(text, flush=True)
    if self.files:
      self.files[1].write(text + "\n")
      self.files[1].flush()

  def record(self, result: dict):
    result = dict(result, seconds_since_start=round(time.time() - self.start, 1))
    line = json.dumps(result, sort_keys=True, default=str)
    print(line, flush=True)
    for f in self.files:
      f.write(line + "\n")
      f.flush()

  def stage(self, name, fn):
    needed = 1 if self.args.dry_run else NEEDS[name]
    if self.left() < needed:
      self.say(f"== {name}: skipped, {self.left():.0f} s left (needs {needed})")
      return
    self.say(f"== {name} ({self.left():.0f} s left)")
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except  # Report it, go on to the next.
      self.say(f"== {name} failed: {type(e).__name__}: {str(e).strip().splitlines()[:1]}")
      self.record({"stage": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"})


# ------------------------------------------------------------------ shapes
def b16_shapes(args):
  """(rows, width, hidden) of the B/16 channel and token MLPs at this batch."""
  if args.dry_run:
    return {"channel": (37, 40, 72), "token": (45, 24, 40)}
  b = args.batch_size
  return {"channel": (b * 196, 768, 3072), "token": (b * 768, 196, 384)}


def tiles(args, **kw):
  from mixer_jax.kernels import pallas
  if args.dry_run:
    kw = dict(dict(block_m=16, block_n=16, block_k=16, ln_elements=64, ln_programs=4),
              **{k: v for k, v in kw.items() if k in ("num_warps", "num_stages")})
    return pallas.Tiles(interpret=True, **kw)
  return pallas.Tiles(**kw)


def time_ms(fn, *args, steps=20):
  import jax
  compiled = jax.jit(fn).lower(*args).compile()
  times = benchmark.time_steps(lambda: compiled(*args), warmup=2, steps=steps)
  return 1e3 * statistics.median(times)


def operands(rows, width, hidden, seed=0):
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(jax.random.key(seed), 9)
  bf = jnp.bfloat16
  n = lambda k, shape, s=1.0: (s * jax.random.normal(k, shape)).astype(bf)
  return dict(
      x=n(ks[0], (rows, width)), scale=1.0 + 0.1 * jax.random.normal(ks[1], (width,)),
      bias=0.1 * jax.random.normal(ks[2], (width,)),
      w1=n(ks[3], (width, hidden), width ** -0.5), b1=n(ks[4], (hidden,), 0.1),
      w2=n(ks[5], (hidden, width), hidden ** -0.5), b2=n(ks[6], (width,), 0.1),
      g=n(ks[7], (rows, width)), w2t=n(ks[8], (width, hidden), hidden ** -0.5))


def forms(t):
  """name -> (pallas form, plain form, argument names, FLOPs fn or None)."""
  import jax
  import jax.numpy as jnp
  from mixer_jax.kernels import pallas as P

  def vjp(f, n):  # Forward and backward: the gradient of every argument, given dy.
    return lambda *a: jax.vjp(f, *a[:n])[1](a[n])

  ln = lambda x, s, b: P.layer_norm(x, s, b, dtype=jnp.bfloat16, tiles=t)
  ln_plain = lambda x, s, b: P.layer_norm_plain(x, s, b, dtype=jnp.bfloat16)
  mlp = lambda x, w1, b1, w2, b2: P.mlp(x, w1, b1, w2, b2, tiles=t)
  mm = lambda r, w, h: 2.0 * r * w * h
  return {
      "layer_norm": (ln, ln_plain, ("x", "scale", "bias"), None),
      "layer_norm fwd+bwd": (vjp(ln, 3), vjp(ln_plain, 3), ("x", "scale", "bias", "x"), None),
      "dense_gelu": (lambda x, w, b: P.dense_gelu(x, w, b, tiles=t), P.dense_gelu_plain,
                     ("x", "w1", "b1"), lambda r, w, h: mm(r, w, h)),
      "gelu_grad_matmul": (lambda g, w, h: P.gelu_grad_matmul(g, w, h, tiles=t),
                           P.gelu_grad_matmul_plain, ("g", "w2t", "h"),
                           lambda r, w, h: mm(r, w, h)),
      "mlp": (mlp, P.mlp_plain, ("x", "w1", "b1", "w2", "b2"), lambda r, w, h: 2 * mm(r, w, h)),
      "mlp fwd+bwd": (vjp(mlp, 5), vjp(P.mlp_plain, 5), ("x", "w1", "b1", "w2", "b2", "g"),
                      lambda r, w, h: 6 * mm(r, w, h)),
  }


def _args_for(names, ops):
  return [ops[n] for n in names]


def _with_h(ops, rows, hidden):
  import jax.numpy as jnp
  from mixer_jax.kernels import pallas as P
  ops = dict(ops)
  ops["h"] = P._dense(ops["x"], ops["w1"], ops["b1"]).astype(jnp.bfloat16)
  return ops


# ------------------------------------------------------------------ stages
def check(run, args):
  """Each kernel against its plain form on this device: max |diff| / max |plain|."""
  import jax
  import numpy as np
  from mixer_jax.kernels import pallas as P
  t = tiles(args)
  result = {"stage": "check", "gpu_available": P.gpu_available(), "tiles": dataclasses.asdict(t)}
  for shape_name, (rows, width, hidden) in b16_shapes(args).items():
    ops = _with_h(operands(rows, width, hidden), rows, hidden)
    for name, (fast, plain, names, _) in forms(t).items():
      if name.startswith("layer_norm") and shape_name == "token":
        continue
      a = _args_for(names, ops)
      got, want = jax.jit(fast)(*a), jax.jit(plain)(*a)
      errs = [float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))) /
                    max(1e-30, float(np.max(np.abs(np.asarray(y, np.float32))))))
              for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]
      result[f"{shape_name} {name}"] = max(errs)
  run.say(f"   kernels compile here: {result['gpu_available']}; worst relative difference "
          f"{max(v for k, v in result.items() if k.startswith(('channel', 'token'))):.2e}")
  run.record(result)


def kernel_table(run, args, t=None, names=None, stage="kernels"):
  """ms of each form, Pallas and plain, on the B/16 shapes; TFLOP/s where it is a matmul."""
  t = t or tiles(args)
  steps = 3 if args.dry_run else 20
  rows_out = []
  for shape_name, (rows, width, hidden) in b16_shapes(args).items():
    ops = _with_h(operands(rows, width, hidden), rows, hidden)
    for name, (fast, plain, arg_names, flops) in forms(t).items():
      if (names and name not in names) or (name.startswith("layer_norm") and shape_name == "token"):
        continue
      a = _args_for(arg_names, ops)
      ms = time_ms(fast, *a, steps=steps)
      ms_plain = None if names else time_ms(plain, *a, steps=steps)
      row = {"stage": stage, "shape": shape_name, "form": name, "rows": rows, "width": width,
             "hidden": hidden, "pallas_ms": ms, "xla_ms": ms_plain,
             "speedup": ms_plain / ms if ms_plain else None, "tiles": dataclasses.asdict(t)}
      if flops:
        row["pallas_tflops"] = flops(rows, width, hidden) / ms / 1e9
        row["xla_tflops"] = ms_plain and flops(rows, width, hidden) / ms_plain / 1e9
      rows_out.append(row)
      run.record(row)
      run.say(f"   {shape_name:7s} {name:18s} pallas {ms:8.3f} ms" +
              (f"  xla {ms_plain:8.3f} ms  x{ms_plain / ms:5.2f}" if ms_plain else ""))
  return rows_out


def sweep(run, args):
  for kw in SWEEP:
    run.say(f"   tiles {kw}")
    kernel_table(run, args, tiles(args, **kw), names=("dense_gelu", "gelu_grad_matmul"),
                 stage="sweep")


def bench_args(args, variant, mode):
  flags = [f"--variant={variant}", f"--batch_size={args.batch_size}", "--dtype=bfloat16",
           f"--mode={mode}", "--kernels=xla", f"--steps={args.steps}"]
  if args.dry_run:
    flags = [f"--variant={variant}", "--batch_size=2", "--image_size=32", "--num_blocks=1",
             "--hidden_dim=16", "--tokens_mlp_dim=8", "--channels_mlp_dim=16",
             "--num_classes=10", f"--mode={mode}", "--kernels=xla", "--steps=2",
             "--peak_size=0"]
  return benchmark.parse_args(flags)


def model_ab(run, args, variant, mode):
  """The step with kernels="xla" and "pallas", built in one process, timed alternately."""
  import gc
  import jax
  from mixer_jax.kernels import pallas
  parsed = bench_args(args, variant, mode)
  make = benchmark.TrainBench if mode == "train" else benchmark.ForwardBench
  benches, flops = {}, None
  for kind in ("xla", "pallas"):
    kind_args = argparse.Namespace(**vars(parsed))
    kind_args.kernels = kind  # The same flags but the kernel set.
    start = time.time()
    benches[kind] = make(kind_args)
    run.say(f"   {variant} {mode} {kind}: built and compiled in {time.time() - start:.0f} s")
  try:
    flops = benches["xla"].flops_per_image()
  except Exception as e:  # pylint: disable=broad-except
    run.say(f"   FLOPs not counted: {type(e).__name__}")
  times = {kind: [] for kind in benches}
  for kind in benches:
    benchmark.time_steps(benches[kind].run, 2, 0)  # Warm-up.
  for _ in range(1 if args.dry_run else args.windows):
    for kind, bench in benches.items():
      times[kind] += benchmark.time_steps(bench.run, 0, parsed.steps)
  device = jax.devices()[0].device_kind
  peak = benchmark.datasheet_peak(device, "bfloat16")
  matmul = None if args.dry_run else benchmark.measure_peak("bfloat16", 8192)["peak_matmul_flops"]
  # Whether "pallas" ran the kernels (not the plain ops it falls back to): their count.
  triton_calls = len(_TRITON_CALL.findall(benches["pallas"].lowered.as_text()))
  result = {"stage": f"{variant} {mode}", "variant": variant, "mode": mode,
            "batch_size": parsed.batch_size, "device_kind": device, "flops_per_image": flops,
            "datasheet_peak_flops": peak, "peak_matmul_flops": matmul,
            "pallas_gpu_available": pallas.gpu_available(), "pallas_triton_calls": triton_calls}
  run.say(f"   Pallas kernels in the pallas program: {triton_calls}")
  for kind, ts in times.items():
    step = statistics.median(ts)
    r = {"step_ms": 1e3 * step, "images_per_s": parsed.batch_size / step, "steps": len(ts)}
    if flops:
      achieved = flops * r["images_per_s"]
      r["mfu"] = peak and achieved / peak
      r["utilisation_vs_matmul"] = matmul and achieved / matmul
    result[kind] = r
    mfu = f", {100 * r['mfu']:.1f} % MFU" if r.get("mfu") else ""
    run.say(f"   {variant} {mode} {kind:6s}: {r['images_per_s']:9.1f} img/s, "
            f"{r['step_ms']:7.2f} ms{mfu}")
  result["speedup"] = result["xla"]["step_ms"] / result["pallas"]["step_ms"]
  run.say(f"   pallas / xla: x{result['speedup']:.3f}")
  run.record(result)
  del benches
  gc.collect()


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  unknown = [n for n in args.stages.split(",") if n not in NEEDS]
  if unknown:
    print(f"Error: unknown stage(s) {unknown}; use some of {', '.join(NEEDS)}.",
          file=sys.stderr)
    return 2
  host_memory.keep_freed_memory()
  import jax
  import flax
  run = Run(args)
  device = benchmark.device_description()
  run.say(f"gpu_pallas: {device.get('device_kind')} x{device.get('device_count')}, jax "
          f"{jax.__version__}, flax {flax.__version__}, budget {args.budget} s"
          + (", dry run" if args.dry_run else ""))
  run.record({"stage": "device", **device, "argv": sys.argv[1:] if argv is None else argv})
  stages = {
      "check": lambda: check(run, args), "kernels": lambda: kernel_table(run, args),
      "train": lambda: model_ab(run, args, "B/16", "train"),
      "eval": lambda: model_ab(run, args, "B/16", "eval"), "sweep": lambda: sweep(run, args),
      "S/16": lambda: (model_ab(run, args, "S/16", "train"), model_ab(run, args, "S/16", "eval")),
      "L/16": lambda: (model_ab(run, args, "L/16", "train"), model_ab(run, args, "L/16", "eval")),
  }
  for name in args.stages.split(","):
    run.stage(name, stages[name])
  run.say(f"== done after {time.time() - run.start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
