r"""models.py at a git revision against the working tree's, in one process, alternating.

  python benchmarks/ab_models.py --before=26f6f49 --mode=train --rounds=10
  python benchmarks/ab_models.py --before=26f6f49 --mode=eval

Both versions of the step (the train step main runs, or the eval forward) are built by
mixer_jax.benchmark with the same arguments, compiled side by side, then timed in
`--rounds` alternating rounds of `--steps_per_round` steps each, so that the slow
patches of a shared machine hit both; each figure is the median over all its timed
steps. Only the model code differs: the `--before` step is built while
`models.create_model` is the one from `git show <before>:mixer_jax/models.py`; rounds
alternate which version goes first. Other arguments go to mixer_jax.benchmark's parser
(`--variant`, `--batch_size`, `--dtype`, ...; its `--steps` and `--peak_size` have no
effect here).
The last stdout line is one JSON object.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import mixer_jax  # noqa: E402  (first: host_memory.py's malloc settings, as in main)
from mixer_jax import benchmark, models  # noqa: E402


def load_models_at(revision: str):
  """mixer_jax/models.py as of `revision` (or a models.py file), as a separate module."""
  if revision.endswith(".py"):
    if not os.path.isfile(revision):
      raise SystemExit(f"ab_models.py: no file {revision!r}; pass a models.py file or a "
                       "commit of this repository.")
    # A copy of models.py: for a checkout whose git history lacks the revision (the
    # copy can be written with `git show REV:mixer_jax/models.py > before_models.py`).
    with open(revision) as f:
      source = f.read()
    revision = os.path.basename(revision)[:-3]
  else:
    try:
      source = subprocess.run(["git", "show", f"{revision}:mixer_jax/models.py"],
                              cwd=_REPO_ROOT, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
      raise SystemExit(f"ab_models.py: cannot read mixer_jax/models.py at {revision!r} "
                       f"({e.stderr.strip()}); pass a commit of this repository or a "
                       "models.py file.")
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(source)
  try:
    spec = importlib.util.spec_from_file_location(f"models_at_{revision}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    os.unlink(f.name)
  return module


def git_state() -> dict:
  """The working tree's commit, and whether its mixer_jax/ differs from it."""
  run = lambda *cmd: subprocess.run(["git", *cmd], cwd=_REPO_ROOT, capture_output=True,
                                    text=True).stdout.strip()
  return {"after_commit": run("rev-parse", "HEAD"),
          "after_uncommitted_changes": bool(run("status", "--porcelain", "--", "mixer_jax"))}


def build(args, create_model):
  """A zero-argument function running one step of the requested mode."""
  import jax
  saved, models.create_model = models.create_model, create_model
  try:
    step, _ = benchmark.step_program(args)
  finally:
    models.create_model = saved
  return lambda: jax.block_until_ready(step())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--before", required=True,
                      help="git revision of the baseline models.py, or a models.py file")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--steps_per_round", type=int, default=3)
  ours, rest = parser.parse_known_args(argv)
  try:
    args = benchmark.parse_args(rest)
  except ValueError as e:  # BenchmarkError, or an unknown variant.
    parser.error(str(e))
  if args.mode not in ("train", "eval"):
    parser.error("--mode must be train or eval.")
  if ours.rounds < 1 or ours.steps_per_round < 1:
    parser.error("--rounds and --steps_per_round must be at least 1.")
  steps = {"before": build(args, load_models_at(ours.before).create_model),
           "after": build(args, models.create_model)}
  for step in steps.values():  # Untimed warm-up.
    for _ in range(max(args.warmup, 1)):
      step()
  times = {name: [] for name in steps}
  for round_index in range(ours.rounds):
    order = list(steps.items())
    for name, step in (order if round_index % 2 == 0 else order[::-1]):
      for _ in range(ours.steps_per_round):
        start = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - start)
  median = {name: statistics.median(t) for name, t in times.items()}
  result = {"before": ours.before, "mode": args.mode, "variant": args.variant,
            "batch_size": args.batch_size, "image_size": args.image_size,
            "dtype": args.dtype, "remat": args.remat, "stoch_depth": args.stoch_depth,
            "mixup_alpha": args.mixup_alpha,
            "model_overrides": benchmark.model_overrides(args), "warmup": args.warmup,
            **git_state(), "rounds": ours.rounds,
            "steps_per_round": ours.steps_per_round,
            "before_step_time_s": median["before"], "after_step_time_s": median["after"],
            "speedup": median["before"] / median["after"],
            "device": benchmark.device_description()}
  print(f"{args.mode} {args.variant} batch {args.batch_size}: before ({ours.before}) "
        f"{median['before'] * 1e3:.1f} ms, after {median['after'] * 1e3:.1f} ms per step, "
        f"speedup {result['speedup']:.3f}")
  print(json.dumps(result, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
