"""Fault injection: SIGKILL a training run anywhere, restart it, get the same run.

    bash tests/run.sh -m faults                         # in CI: 3 kill points
    MIXER_FAULT_KILLS=10 bash tests/run.sh -m faults    # the full version

The reference run and the killed-and-restarted run must end with bit-identical
parameters (CPU). Checkpoints are written every step, so most kills land inside a
checkpoint write (about a third of each step's wall time is saving).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, config_flags
from mixer_jax import checkpoint

pytestmark = pytest.mark.faults

STEPS = 24


def _flags(data_dir, workdir):
  return config_flags(data_dir, num_train_steps=STEPS, checkpoint_every_steps=1,
                      keep_checkpoints=2, log_every_steps=4, eval_every_steps=STEPS,
                      shuffle_buffer=64) + [f"--workdir={workdir}"]


def _start(data_dir, workdir, log_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  # Logs go to a file: a pipe nobody reads would fill up and stall the run.
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "mixer_jax.main", "--config=configs/default.py"]
        + _flags(data_dir, workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=log)


def _finish(proc, log_path):
  proc.wait(timeout=600)
  with open(log_path) as f:
    log = f.read()
  assert proc.returncode == 0, log[-3000:]
  return log


def _wait_until_training(proc, log_path, timeout=300):
  """Blocks until the run logs its first training line (imports, restore and
  compilation done) or exits."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    with open(log_path) as f:
      if "Training S/2" in f.read():
        return
    time.sleep(0.05)


def _latest_step(workdir) -> int:
  path = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=0)


def _save_in_progress(workdir) -> bool:
  """Whether a checkpoint write was cut: orbax temp dirs or a data-state temp dir."""
  for root, dirs, _ in os.walk(workdir):
    if any("tmp" in d for d in dirs):
      return True
  return False


def _final_params(workdir):
  params, _ = checkpoint.load_params(str(workdir))
  return checkpoint.flatten(params)


def _assert_identical(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  log = workdir.parent / "reference.log"
  proc = _start(data_dir, workdir, log)
  _wait_until_training(proc, log)
  start = time.time()
  _finish(proc, log)
  return workdir, _final_params(workdir), time.time() - start


def test_sigkill_anywhere_then_restart_is_bit_identical(data_dir, tmp_path, reference):
  _, expected, train_seconds = reference
  kills = int(os.environ.get("MIXER_FAULT_KILLS", "3"))
  rng = random.Random(int(os.environ.get("MIXER_FAULT_SEED", "0")))
  workdir = tmp_path / "killed"
  killed, during_save, attempts = 0, 0, 0
  while True:
    attempts += 1
    assert attempts <= 4 * kills + 4, "the run made no progress between kills"
    log_path = tmp_path / f"attempt_{attempts}.log"
    proc = _start(data_dir, workdir, log_path)
    final_saved = os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))
    if killed < kills and not final_saved:
      # Kill anywhere in the training part of the run (steps, checkpoint writes,
      # evaluation), timed from the moment the run starts training.
      _wait_until_training(proc, log_path)
      # Spread the remaining kills over the remaining steps.
      done = _latest_step(workdir)
      remaining = train_seconds * (STEPS - done) / STEPS
      deadline = time.time() + rng.uniform(0.0, 1.6 * remaining / (kills - killed + 1))
      while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
        during_save += _save_in_progress(workdir)
        continue
    log = _finish(proc, log_path)
    if killed >= kills or final_saved or os.path.isdir(
        os.path.join(workdir, "checkpoints", str(STEPS))):
      break
  print(f"{killed} kills, {during_save} during a checkpoint write, {attempts} starts")
  assert killed == kills, f"only {killed} of {kills} kills landed before the run finished"
  if killed >= 10:
    assert during_save >= 1, "no kill landed inside a checkpoint write"
  # The last start resumed (it did not silently start over from step 0).
  assert "Resumed from step" in log
  _assert_identical(_final_params(workdir), expected)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path,
                                                                    reference):
  ref_dir, expected, _ = reference
  workdir = tmp_path / "truncated"
  shutil.copytree(ref_dir, workdir)
  latest = os.path.join(workdir, "checkpoints", str(STEPS))
  victims = [os.path.join(root, f) for root, _, files in os.walk(latest) for f in files
             if os.path.getsize(os.path.join(root, f)) > 1000]
  for path in victims:  # Truncate every data file of the newest step.
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  err = _finish(_start(data_dir, workdir, tmp_path / "run.log"), tmp_path / "run.log")
  assert f"Checkpoint step {STEPS}" in err and "unreadable" in err
  assert f"Resumed from step {STEPS - 1}" in err
  assert os.listdir(os.path.join(workdir, "unreadable_checkpoints"))  # Kept, not deleted.
  # The run fell back to step STEPS-1, redid the last step and ended where it would have.
  _assert_identical(_final_params(workdir), expected)
