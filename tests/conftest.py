"""Shared fixtures: a session TFDS data dir with the embedded digits, tiny configs;
the markers `slow`, `multiprocess` and `faults`.

Tests mirror the modules: tests/test_<module>.py for mixer_jax/<module>.py (and
test_configs.py for configs/, test_launch.py for launch/, test_timm_compare.py and
test_profile_step.py for benchmarks/; test_errors.py is the README's error catalogue).
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
  # None is deselected by default: `bash tests/run.sh` (CI) runs every test; a quick
  # suite is `bash tests/run.sh -m "not slow and not multiprocess and not faults"`.
  config.addinivalue_line("markers", "slow: a single-process test of more than ~8 s.")
  config.addinivalue_line("markers", "faults: kill-and-resume fault injection (slow).")
  config.addinivalue_line("markers", "multiprocess: runs several JAX processes on localhost.")
  config.addinivalue_line("markers", "xdist_group(name): tests that one xdist worker runs "
                          "in order (see pytest_collection_modifyitems).")
  _share_compilation_cache(config)


# XLA compiles are most of the suite's time, and many tests compile the same small
# programs: the digits config's train and eval steps in process and again in every
# command-line subprocess. One persistent compilation cache for the whole run (the
# xdist workers and every process they start inherit its directory through the
# environment) compiles each program once. A hit loads the executable that compile
# wrote, so the bit-identity checks compare what a fresh compile gives; a test that
# signals a process during its compile starts it without the cache (test_train.py). The
# directory lives as long as the run: each run starts cold, as CI does.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def _share_compilation_cache(config):
  if os.environ.get(_CACHE_ENV):  # An xdist worker (the controller set it) or the user.
    return
  config._compilation_cache = tempfile.mkdtemp(prefix="mixer_jax_test_xla_cache_")
  os.environ[_CACHE_ENV] = config._compilation_cache
  os.environ[_MIN_COMPILE_TIME_ENV] = "0"  # The tiny programs too.


def without_compilation_cache(env):
  """`env` for a process that must compile cold (a signal aimed at XLA's compiler)."""
  return {k: v for k, v in env.items() if k != _CACHE_ENV}


def pytest_unconfigure(config):
  if getattr(config, "_compilation_cache", None):
    shutil.rmtree(config._compilation_cache, ignore_errors=True)
    for name in (_CACHE_ENV, _MIN_COMPILE_TIME_ENV):
      os.environ.pop(name, None)


# Under pytest-xdist (tests/run.sh: -n 2 --dist loadgroup) a worker takes whole groups:
# each test file is one group, so its module-scoped fixtures (a trained run, a prepared
# dataset) are built once, not once per worker. The tests that start several processes
# or kill them on a clock (markers multiprocess and faults) form one group across files:
# they run one at a time, beside at most one other worker, never two gloo pairs or a
# timed kill against another multi-process run. Groups with a slow test go first, so the
# longest groups do not start last and leave one worker idle at the end.
PROCESS_GROUP = "processes"


def _group(item):
  if item.get_closest_marker("multiprocess") or item.get_closest_marker("faults"):
    return PROCESS_GROUP
  return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # Before xdist's own hook reads the groups.
def pytest_collection_modifyitems(config, items):
  if getattr(config.option, "dist", "no") == "no":
    return
  groups = {}
  for item in items:
    group = _group(item)
    item.add_marker(pytest.mark.xdist_group(group))
    groups.setdefault(group, []).append(item)
  light = lambda group: not any(
      item.get_closest_marker(m) for item in groups[group]
      for m in ("slow", "faults", "multiprocess"))
  items[:] = [item for group in sorted(groups, key=light) for item in groups[group]]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """TFDS data dir holding the prepared `mixer_digits` (offline, ~3 s)."""
  from mixer_jax.datasets import digits
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(path)
  return path


TINY_MODEL = dict(patch_size=2, num_blocks=2, hidden_dim=16, tokens_mlp_dim=16,
                  channels_mlp_dim=32)


def tiny_config(data_dir, /, **overrides):
  """configs/default.py shrunk to a few fast steps."""
  from configs import default
  c = default.get_config()
  c.data_dir = data_dir
  for k, v in TINY_MODEL.items():
    c.model[k] = v
  c.batch_size = 32
  c.num_train_steps = 4
  c.warmup_steps = 1
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.log_image_grid = False
  return set_overrides(c, overrides)


def model_of(variant, num_classes, kernels="auto", **fields):
  """The preset's model (fields given replacing the preset's) computed with the
  `kernels` forms, as state.Setup builds it (kernels/__init__.py)."""
  from mixer_jax import kernels as kernel_sets, models
  return kernel_sets.Intercepted(models.from_preset(variant, num_classes, **fields),
                                 kernel_sets.interceptors(kernels))


def set_overrides(config, overrides):
  """Sets dotted keys ("model.hidden_dim") like --config.KEY=VALUE does; returns config."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def config_flags(data_dir, **overrides):
  """The same tiny config as command-line flags for `python -m mixer_jax.main`."""
  flags = {"data_dir": data_dir, "batch_size": 32, "num_train_steps": 4, "warmup_steps": 1,
           "log_every_steps": 2, "eval_every_steps": 4, "checkpoint_every_steps": 2,
           "log_image_grid": False}
  flags.update({f"model.{k}": v for k, v in TINY_MODEL.items()})
  flags.update(overrides)
  return [f"--config.{k}={v}" for k, v in flags.items()]


def read_metrics(workdir):
  """Every row of WORKDIR/metrics.jsonl as written, repeats included (a run that started
  over logs a step twice; mixer_jax.tools.plot.read_metrics keeps the last)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def run_main(args, env_extra=None, timeout=300, config="configs/default.py"):
  """Runs `python -m mixer_jax.main` in a subprocess; returns CompletedProcess."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "mixer_jax.main", f"--config={config}"] + list(args)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def run_mains(*runs, timeout=300):
  """Runs several `python -m mixer_jax.main` at once, each given as (args, env_extra):
  independent runs of a test overlap their process starts and compilations on the
  test machine's cores. Returns their CompletedProcesses in order."""
  with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
    futures = [pool.submit(run_main, args, env_extra, timeout) for args, env_extra in runs]
    return [f.result() for f in futures]
