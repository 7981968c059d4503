r"""Where the train step's (or eval forward's) time goes, kernel by kernel.

  pip install -e .    # once: mixer_jax importable from anywhere
  python benchmarks/profile_step.py --out=/tmp/prof --variant=B/16 --batch_size=256 \
      --dtype=bfloat16 --mode=train

Builds the same step as mixer_jax.tools.benchmark (its flags are accepted here), runs
`--warmup` untimed steps, then traces `--profile_steps` steps with jax.profiler. Device
time is read back from the trace: on a GPU the kernels of each stream, on a CPU the ops
of XLA's threads. Writes to `--out`:
  profile.json   per trace line: every op name with its calls and total time, biggest
                 first; the step count; matmul and other time per step; and
                 `by_source`: the time of all lines grouped by the model code each op
                 comes from (its HLO op_name, block index folded: MixerBlock_*) and
                 result shape, e.g. every block's token-MLP bias+GELU forward in one row
  hlo.txt        the compiled (optimised) program, to look up what a fusion holds
  the raw trace (plugins/profile/...), for TensorBoard's or xprof's viewer.
Prints the top ops of the busiest line per step, then the top `by_source` rows; the
last stdout line is one JSON object with the totals.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys

from mixer_jax import host_memory
from mixer_jax.tools import benchmark

# Kernel or op names of matrix products: cuBLAS/cuDNN/CUTLASS kernels, XLA's Triton gemm
# fusions and custom calls, CPU library calls.
_MATMUL = re.compile(r"gemm|xmma|cutlass|cublas|matmul|dot|sm90_|sm80_|ynn|onednn|xnn",
                     re.IGNORECASE)
# Profiler bookkeeping, not device work.
_IGNORED = re.compile(r"ThreadpoolListener|ThunkExecutor|Await|^\$|MemcpyHtoD|MemcpyDtoH", re.IGNORECASE)


def _parser():
  p = argparse.ArgumentParser(prog="benchmarks/profile_step.py", add_help=False)
  p.add_argument("--out", required=True, help="Folder for profile.json, hlo.txt, the trace.")
  p.add_argument("--profile_steps", type=int, default=3, help="Steps traced.")
  p.add_argument("--top", type=int, default=30, help="Ops printed.")
  return p


def device_lines(profile):
  """[(plane/line name, events)] of the lines that hold device work."""
  lines = []
  for plane in profile.planes:
    if plane.name.startswith("/device:"):  # GPU/TPU: kernels per stream, XLA ops.
      lines += [(f"{plane.name}/{line.name}", list(line.events)) for line in plane.lines]
  if not lines:  # CPU: XLA's ops run on its client and Eigen threads of the host plane.
    for plane in profile.planes:
      if plane.name == "/host:CPU":
        lines += [(f"{plane.name}/{line.name}", list(line.events)) for line in plane.lines
                  if line.name.startswith("tf_XLA")]
  return lines


def summarize(lines, steps: int):
  """Per line: {name: [calls, total ns]} biggest first, and matmul/other ms per step."""
  out = {}
  for line_name, events in lines:
    per_op = collections.defaultdict(lambda: [0, 0.0])
    stats = {}  # The first event's stats per name (on GPUs: the HLO op, the launch shape).
    for e in events:
      if _IGNORED.search(e.name):
        continue
      per_op[e.name][0] += 1
      per_op[e.name][1] += e.duration_ns
      if e.name not in stats:
        stats[e.name] = {str(k): str(v)[:200] for k, v in e.stats}
    if not per_op:
      continue
    ops = sorted(per_op.items(), key=lambda kv: -kv[1][1])
    matmul = sum(t for name, (_, t) in ops if _MATMUL.search(name))
    total = sum(t for _, (_, t) in ops)
    out[line_name] = {"ms_per_step": total / steps / 1e6,
                      "matmul_ms_per_step": matmul / steps / 1e6,
                      "other_ms_per_step": (total - matmul) / steps / 1e6,
                      "ops": [[name, calls, t / 1e6, stats[name]] for name, (calls, t) in ops]}
  return out


# An HLO instruction of the compiled program: name, result shape, metadata op_name.
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%(\S+) = (\([^)]*\)|\S+) [^\n]*?op_name="([^"]*)"', re.MULTILINE)


def op_sources(hlo_text: str):
  """HLO instruction name -> (result shape, op_name without the jit prefix, blocks folded)."""
  sources = {}
  for name, shape, op_name in _INSTRUCTION.findall(hlo_text):
    op_name = re.sub(r"MixerBlock_\d+", "MixerBlock_*", op_name)
    sources[name] = (shape, op_name.split(")/", 1)[-1] if op_name.startswith("jit(")
                     else op_name)
  return sources


def by_source(summary, sources, steps: int):
  """Time per step of all lines, grouped by (op_name, shape); biggest first.

  Summed over lines: on a CPU that is thread time (an op split over two threads counts
  twice), on a GPU kernel time over streams.
  """
  totals = collections.defaultdict(float)
  for line in summary.values():
    for name, _, ms, stats in line["ops"]:
      op = stats.get("hlo_op", name)
      shape, source = sources.get(op, ("?", op))
      totals[(source, shape)] += ms / steps
  rows = sorted(totals.items(), key=lambda kv: -kv[1])
  return [{"source": source, "shape": shape, "ms_per_step": ms} for (source, shape), ms in rows]


def main(argv=None) -> int:
  host_memory.keep_freed_memory()  # First, before JAX starts its threads.
  own, rest = _parser().parse_known_args(argv)
  try:
    args = benchmark.parse_args(rest)
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  if args.mode not in ("train", "eval"):
    print("Error: profile_step.py profiles --mode=train or --mode=eval.", file=sys.stderr)
    return 2
  if own.profile_steps < 1:
    print(f"Error: --profile_steps={own.profile_steps} must be at least 1.", file=sys.stderr)
    return 2
  import jax
  from jax.profiler import ProfileData
  os.makedirs(own.out, exist_ok=True)
  bench = (benchmark.TrainBench if args.mode == "train" else benchmark.ForwardBench)(args)
  step, compiled = bench.run, bench.compiled
  hlo_text = compiled.as_text()
  with open(os.path.join(own.out, "hlo.txt"), "w") as f:
    f.write(hlo_text)
  for _ in range(max(args.warmup, 1)):
    jax.block_until_ready(step())
  trace_dir = os.path.join(own.out, "trace")
  with jax.profiler.trace(trace_dir):
    for _ in range(own.profile_steps):
      jax.block_until_ready(step())
  traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not traces:
    print(f"Error: jax.profiler wrote no trace under {trace_dir}.", file=sys.stderr)
    return 1
  summary = summarize(device_lines(ProfileData.from_file(traces[-1])), own.profile_steps)
  memory = compiled.memory_analysis()
  result = {"mode": args.mode, "variant": args.variant, "batch_size": args.batch_size,
            "dtype": args.dtype, "profile_steps": own.profile_steps,
            "device": benchmark.device_description(), "lines": summary,
            "by_source": by_source(summary, op_sources(hlo_text), own.profile_steps),
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
  with open(os.path.join(own.out, "profile.json"), "w") as f:
    json.dump(result, f, indent=1)
  if summary:
    busiest = max(summary, key=lambda k: summary[k]["ms_per_step"])
    line = summary[busiest]
    print(f"{busiest}: {line['ms_per_step']:.2f} ms per step, matmuls "
          f"{line['matmul_ms_per_step']:.2f} ms, other {line['other_ms_per_step']:.2f} ms")
    for name, calls, ms, _ in line["ops"][:own.top]:
      print(f"  {ms / own.profile_steps:8.3f} ms  {calls / own.profile_steps:5.1f}x  {name[:110]}")
    print("All lines, by the model code each op comes from (ms per step; CPU: thread time):")
    for row in result["by_source"][:own.top]:
      print(f"  {row['ms_per_step']:8.3f} ms  {row['shape'][:28]:28s}  {row['source'][:100]}")
  totals = {k: {f: v[f] for f in ("ms_per_step", "matmul_ms_per_step", "other_ms_per_step")}
            for k, v in summary.items()}
  print(json.dumps({"mode": args.mode, "variant": args.variant, "lines": totals,
                    "temp_bytes": result["temp_bytes"]}, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
