r"""The benchmark under several XLA flag sets and code variants, one process each.

  python benchmarks/flag_sweep.py --candidates=baseline,cublaslt,tanh_gelu -- \
      --variant=B/16 --batch_size=256 --dtype=bfloat16 --mode=train

XLA reads its flags once per process, so each candidate runs
`python -m mixer_jax.benchmark <args after -->` in its own process with the
candidate's flags appended to XLA_FLAGS (and its code variant applied first, where it
has one); the baseline runs first and last, and every ratio is to the faster of the two
baseline runs. Candidates are tried in the order given until `--deadline_s` would be
passed. Prints one line per candidate as it finishes, then a table; the last stdout line
is one JSON object. A candidate whose process fails (an XLA flag this build lacks, say)
is reported as failed with its last error line.
"""

import argparse
import json
import os
import subprocess
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (XLA flags, code variant). Code variants: see `apply_code_variant`.
CANDIDATES = {
    "baseline": ("", None),
    # cuBLASLt can fuse the bias add (and a tanh-form GELU) into the matmul's epilogue.
    "cublaslt": ("--xla_gpu_enable_cublaslt=true", None),
    "tanh_gelu": ("", "tanh_gelu"),
    "flax_layer_norm": ("", "flax_layer_norm"),
    "unfused_bias_gelu": ("", "unfused_bias_gelu"),
    "cublaslt_tanh_gelu": ("--xla_gpu_enable_cublaslt=true", "tanh_gelu"),
    # Triton for every matmul, so XLA may fuse element-wise producers into them.
    "triton_gemm_any": ("--xla_gpu_triton_gemm_any=true", None),
    "no_triton_gemm": ("--xla_gpu_enable_triton_gemm=false", None),
    # cuDNN GEMM fusions (element-wise work fused around the matmul).
    "cudnn_gemm_fusion": ("--xla_gpu_cudnn_gemm_fusion_level=3", None),
    "all_fusions_triton": ("--xla_gpu_experimental_all_fusions_with_triton=true", None),
    "no_command_buffer": ("--xla_gpu_enable_command_buffer=", None),
}


def apply_code_variant(name):
  """Code variants, applied in the candidate's process before the benchmark runs."""
  import jax
  from mixer_jax import models
  if name == "tanh_gelu":  # The same function in its 0.5 x (1 + tanh(u)) form, by autodiff.
    models.gelu = lambda x: jax.nn.gelu(x, approximate=True)
    models.bias_gelu = lambda y, bias: jax.nn.gelu(y + bias, approximate=True)
  elif name == "flax_layer_norm":  # models.layer_norm without its custom VJP rule.
    models.layer_norm = models.layer_norm.fun
  elif name == "unfused_bias_gelu":  # gelu(y + bias) by autodiff (gelu's own JVP rule).
    models.bias_gelu = models.bias_gelu.fun
  elif name:
    raise SystemExit(f"flag_sweep.py: unknown code variant {name!r}.")


def _parser():
  p = argparse.ArgumentParser(prog="benchmarks/flag_sweep.py")
  p.add_argument("--candidates", default=",".join(CANDIDATES),
                 help=f"Comma-separated, tried in this order: {', '.join(CANDIDATES)}.")
  p.add_argument("--deadline_s", type=float, default=3600.0,
                 help="Start no candidate after this many seconds (the last baseline too).")
  p.add_argument("--timeout_s", type=float, default=600.0, help="Per candidate process.")
  p.add_argument("--json_out", default="", help="Also write the JSON to this file.")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  return p


def run_candidate(name, bench_args, timeout_s):
  flags, code = CANDIDATES[name]
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  cmd = [sys.executable, os.path.abspath(__file__), f"--_child={code or ''}", "--", *bench_args]
  start = time.time()
  try:
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"name": name, "flags": flags, "code": code, "ok": False,
            "error": f"timed out after {timeout_s:.0f} s", "wall_s": time.time() - start}
  out = {"name": name, "flags": flags, "code": code, "wall_s": time.time() - start}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode == 0 and lines and lines[-1].startswith("{"):
    result = json.loads(lines[-1])
    out.update(ok=True, **{k: result.get(k) for k in (
        "images_per_s", "step_time_s", "mfu", "utilisation_vs_matmul", "flops_per_image")})
    out["device_kind"] = result.get("device", {}).get("device_kind")
  else:
    errors = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    out.update(ok=False, error=(errors[-1] if errors else f"exit {proc.returncode}")[:300])
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  own_argv, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
      if "--" in argv else (argv, [])
  args = _parser().parse_args(own_argv)
  if args._child is not None:
    sys.path.insert(0, _REPO_ROOT)
    import mixer_jax  # noqa: F401  (first, as in main)
    from mixer_jax import benchmark
    apply_code_variant(args._child)
    return benchmark.main(bench_args)
  names = [n.strip() for n in args.candidates.split(",") if n.strip()]
  unknown = [n for n in names if n not in CANDIDATES]
  if unknown or not names:
    print(f"Error: {'unknown candidate(s) ' + ', '.join(unknown) if unknown else 'no candidate given'}"
          f"; choose from {', '.join(CANDIDATES)}.", file=sys.stderr)
    return 2
  if "--peak_size=0" not in bench_args:
    bench_args = bench_args + ["--peak_size=0"]  # The sweep compares steps, not peaks.
  order = ["baseline"] + [n for n in names if n != "baseline"] + ["baseline"]
  start, results = time.time(), []
  for name in order:
    if time.time() - start > args.deadline_s:
      print(f"deadline: {name} not run", flush=True)
      continue
    r = run_candidate(name, bench_args, args.timeout_s)
    results.append(r)
    print(f"{name:<22} " + (f"{r['images_per_s']:9.1f} img/s  {1e3 * r['step_time_s']:7.2f} ms"
                            if r["ok"] else f"FAILED: {r['error']}")
          + f"  ({r['wall_s']:.0f} s)", flush=True)
  base = [r["images_per_s"] for r in results if r["name"] == "baseline" and r["ok"]]
  best_base = max(base) if base else None
  for r in results:
    r["ratio_to_baseline"] = (r["images_per_s"] / best_base
                              if r["ok"] and best_base else None)
  print(f"\n{'candidate':<22}{'img/s':>10}{'ratio':>8}  flags / code")
  for r in results:
    if r["ok"]:
      print(f"{r['name']:<22}{r['images_per_s']:10.1f}{r['ratio_to_baseline'] or 0:8.3f}  "
            f"{r['flags']} {r['code'] or ''}")
    else:
      print(f"{r['name']:<22}{'failed':>10}{'':8}  {r['flags']} {r['code'] or ''}: {r['error']}")
  summary = {"bench_args": bench_args, "results": results}
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(summary, f, indent=1)
  print(json.dumps(summary, sort_keys=True))
  return 0 if base else 1


if __name__ == "__main__":
  sys.exit(main())
