r"""Compile time of the train step, unrolled against scanned blocks (nn.scan).

  pip install -e .    # once: mixer_jax importable from anywhere
  python benchmarks/compile_time.py --variants=S/32,H/14
  python benchmarks/compile_time.py --variants=S/32,S/16,B/32,B/16,L/32,L/16,H/14 \
      --remat_policy=full --sharding=fsdp

For each variant and layout, a fresh process with `--num_devices` simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count) builds the trainer's train step
(state.Setup: forward, backward, clip, AdamW, jitted with sharding.py's shardings and
the state donated) from abstract shapes only, and times
  setup    state.Setup (model, optimiser, the parameter shapes by jax.eval_shape)
  lower    train_step.lower(...): tracing the step and emitting StableHLO
  compile  lowered.compile(): XLA's SPMD partitioning, optimisation and code generation
for a global batch of --per_device_batch x --num_devices images of --image_size px.
Nothing runs and nothing is allocated beyond the compiler's own memory. Each variant's
layouts run back to back, so a slow spell of a shared machine falls on both. The last
stdout line is one JSON object: every row, and per variant scanned/unrolled ratios.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

LAYOUTS = ("unrolled", "scanned")


def parse(argv):
  from mixer_jax.models import blocks
  p = argparse.ArgumentParser(prog="benchmarks/compile_time.py",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default="S/32,H/14", help="Comma-separated, e.g. S/32,H/14.")
  p.add_argument("--layouts", default=",".join(LAYOUTS), help="unrolled, scanned or both.")
  p.add_argument("--num_devices", type=int, default=8, help="Simulated CPU devices.")
  p.add_argument("--per_device_batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--remat_policy", default="none", choices=blocks.REMAT_POLICIES)
  p.add_argument("--sharding", default="replicate", choices=("replicate", "fsdp"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--kernels", default="auto", choices=("auto", "xla", "cpu"))
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
  bad = [x for x in args.layouts if x not in LAYOUTS]
  if bad or not args.variants or min(args.num_devices, args.per_device_batch) < 1:
    p.error(f"need --variants, --layouts from {', '.join(LAYOUTS)} and positive sizes")
  return args


# ---------------------------------------------------- one variant, one layout
def measure(args) -> dict:
  """In this process (its devices already simulated): one variant, one layout."""
  from mixer_jax.tools import benchmark
  from mixer_jax import host_memory
  host_memory.keep_freed_memory()
  import jax
  from mixer_jax import sharding, state
  (variant,), (layout,) = args.variants, args.layouts
  batch = args.per_device_batch * args.num_devices
  bench_args = benchmark.parse_args([
      f"--variant={variant}", f"--batch_size={batch}", f"--image_size={args.image_size}",
      f"--dtype={args.dtype}", f"--num_classes={args.num_classes}",
      f"--remat_policy={args.remat_policy}", f"--kernels={args.kernels}"]
      + (["--scan"] if layout == "scanned" else []))
  config = benchmark.run_config(bench_args)
  config.sharding = args.sharding
  assert jax.device_count() == args.num_devices, jax.devices()
  start = time.perf_counter()
  setup = state.Setup(config, args.num_classes, total_steps=10_000,
                      mesh=sharding.make_mesh(1))
  step = setup.train_step()
  lowered_at = time.perf_counter()
  lowered = step.lower(setup.abstract_state, setup.abstract_batch(batch))
  compiled_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  stats = compiled.memory_analysis()
  return {"variant": variant, "layout": layout, "num_params": setup.num_params,
          "setup_s": lowered_at - start, "lower_s": compiled_at - lowered_at,
          "compile_s": done - compiled_at, "lower_compile_s": done - lowered_at,
          "stablehlo_chars": len(lowered.as_text()),
          "temp_bytes_per_device": int(stats.temp_size_in_bytes),
          "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(args, variant, layout) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (f"{flags.strip()} --xla_force_host_platform_device_count="
                      f"{args.num_devices}").strip()
  argv = [sys.executable, os.path.abspath(__file__), "--worker", f"--variants={variant}",
          f"--layouts={layout}", f"--num_devices={args.num_devices}",
          f"--per_device_batch={args.per_device_batch}", f"--image_size={args.image_size}",
          f"--num_classes={args.num_classes}", f"--remat_policy={args.remat_policy}",
          f"--sharding={args.sharding}", f"--dtype={args.dtype}", f"--kernels={args.kernels}"]
  proc = subprocess.run(argv, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"Error: {variant} {layout} failed: {proc.stderr.strip()[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  args = parse(argv)
  if args.worker:
    print(json.dumps(measure(args)), flush=True)
    return 0
  rows, ratios = [], {}
  print(f"Train step, {args.image_size} px, batch {args.per_device_batch} per device on "
        f"{args.num_devices} simulated CPU devices, {args.sharding}, remat "
        f"{args.remat_policy}, {args.dtype}:")
  print(f"{'variant':<8}{'layout':<10}{'params':>14}{'setup s':>10}{'lower s':>10}"
        f"{'compile s':>11}{'lower+compile s':>17}{'StableHLO MB':>14}{'RSS GB':>8}")
  for variant in args.variants:
    for layout in args.layouts:
      r = run_worker(args, variant, layout)
      rows.append(r)
      print(f"{variant:<8}{layout:<10}{r['num_params']:>14,}{r['setup_s']:>10.2f}"
            f"{r['lower_s']:>10.2f}{r['compile_s']:>11.2f}{r['lower_compile_s']:>17.2f}"
            f"{r['stablehlo_chars'] / 1e6:>14.2f}{r['max_rss_mb'] / 1024:>8.2f}", flush=True)
    pair = {r["layout"]: r["lower_compile_s"] for r in rows if r["variant"] == variant}
    if len(pair) == 2:
      ratios[variant] = pair["unrolled"] / pair["scanned"]
      print(f"{variant}: scanned lower+compile {ratios[variant]:.2f}x faster than unrolled")
  print(json.dumps({"rows": rows, "unrolled_over_scanned": ratios,
                    "num_devices": args.num_devices, "per_device_batch": args.per_device_batch,
                    "image_size": args.image_size, "sharding": args.sharding,
                    "remat_policy": args.remat_policy, "dtype": args.dtype}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
