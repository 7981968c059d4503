"""distributed.py and multi-process runs: process layouts, preemption, a dying process.

The global batch at step s depends on (seed, s) alone (input_pipeline.py), so runs
with 2 processes x 1 device, 1 x 2 and 1 x 1 train on the same batches with the
default shuffling and give the same losses to float rounding; a run stopped under 2
processes resumes under 1 and ends where an uninterrupted 1-process run ends.
Evaluation sees each test image once in every layout. The learning rate is constant
(no warmup), so runs of different lengths take identical first steps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_mains

TINY = dict(num_blocks=2, hidden_dim=16, tokens_mlp_dim=16, channels_mlp_dim=32)
HEARTBEAT_S = 5
# A survivor exits within the heartbeat timeout plus a few seconds (distributed.py);
# the margin covers a loaded 2-core test machine.
EXIT_BOUND_S = HEARTBEAT_S + 25


def _overrides(data, **extra):
  """Flags of a tiny run on `data`: a TFDS data dir (the embedded digits) or an image
  folder (`folder:` dataset)."""
  dataset = (dict(dataset=f"folder:{data}", train_split="train", eval_split="test")
             if os.path.isdir(os.path.join(data, "train")) else dict(data_dir=data))
  # A large constant learning rate: the losses of steps 2-3 then depend on the batches.
  # Flip and RandAugment in the train step (randaugment_on="device"): each example's
  # draw comes from (seed, step, its global position), so every layout trains on the
  # same augmented batches.
  flags = dict(dataset, randaugment_on="device", train_flip=True, randaugment_layers=2,
               randaugment_magnitude=15,
               batch_size=32, warmup_steps=0, lr_decay="constant", learning_rate=0.03,
               log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=1000,
               log_image_grid=False, **{f"model.{k}": v for k, v in TINY.items()})
  flags.update(extra)
  return flags


def _flags(data, **extra):
  return [f"--config.{k}={v}" for k, v in _overrides(data, **extra).items()]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _metrics(workdir):
  """step -> merged row of WORKDIR/metrics.jsonl, and the raw rows."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip().endswith("}")]
  merged = {}
  for row in rows:
    merged.setdefault(row["step"], {}).update(row)
  return merged, rows


def _wait_for(predicate, procs, timeout, what):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"A process exited before {what}: "
                           f"{[p.poll() for p in procs]}")
    time.sleep(0.2)
  raise AssertionError(f"Timed out after {timeout}s waiting for {what}.")


class _Pair:
  """Two `python -m mixer_jax.main` processes on localhost, logs in files."""

  def __init__(self, workdir, extra_flags, tag):
    port = _free_port()
    self.workdir = str(workdir)
    self.logs = [f"{self.workdir}.{tag}.log{i}" for i in range(2)]
    self.procs = []
    for i in range(2):
      cmd = [sys.executable, "-u", "-m", "mixer_jax.main", "--config=configs/default.py",
             f"--workdir={self.workdir}", f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}",
             f"--heartbeat_timeout_s={HEARTBEAT_S}"] + extra_flags
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log,
                                           stderr=subprocess.STDOUT))

  def log(self, i):
    with open(self.logs[i]) as f:
      return f.read()

  def kill_leftovers(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
  """A 2-process run on the digits from an empty TFDS data dir (a fresh machine: one
  process prepares the dataset, the other waits), SIGTERM to process 1 once step 3 is
  evaluated."""
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  empty_tfds = str(tmp_path_factory.mktemp("empty_tfds"))
  pair = _Pair(workdir, _flags(empty_tfds, num_train_steps=1000), "first")
  try:
    _wait_for(lambda: "eval/loss" in _metrics(workdir)[0].get(3, {}), pair.procs, 400,
              "the evaluation at step 3")
    pair.procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=180) for p in pair.procs]
  finally:
    pair.kill_leftovers()
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  return {"workdir": str(workdir), "codes": codes, "logs": [pair.log(0), pair.log(1)],
          "pids": [p.pid for p in pair.procs], "events": events, "data_dir": empty_tfds}


def _stop_step(log):
  lines = [l for l in log.splitlines() if "Preempted: checkpoint saved at step" in l]
  assert len(lines) == 1, log[-3000:]
  return int(lines[0].split("at step ")[1].split(";")[0])


def _same(a, b, what):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=what)


# ---------------------------------------------------------------- layouts agree
@pytest.mark.multiprocess
def test_two_processes_two_devices_one_device_agree(preempted_run, tmp_path):
  two_procs, rows = _metrics(preempted_run["workdir"])
  # Only process 0 writes metrics (one row per step and kind) and TensorBoard events.
  train_rows = [r["step"] for r in rows if "train/loss" in r]
  assert train_rows == sorted(set(train_rows)), train_rows
  events = preempted_run["events"]
  assert len(events) == 1 and f".{preempted_run['pids'][0]}." in events[0], events
  layouts = {"2 processes x 1 device": two_procs}
  envs = {"1 process x 2 devices": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
          "1 process x 1 device": {"XLA_FLAGS": ""}}
  workdirs = {name: tmp_path / name.replace(" ", "_") for name in envs}
  results = run_mains(*[([f"--workdir={workdirs[name]}"] +
                         _flags(preempted_run["data_dir"], num_train_steps=3),
                         dict(_env(**env))) for name, env in envs.items()], timeout=300)
  for name, result in zip(envs, results):
    assert result.returncode == 0, result.stderr[-3000:]
    layouts[name] = _metrics(workdirs[name])[0]

  reference = layouts["1 process x 1 device"]
  # Steps 2-3 follow real updates (step 1's loss is ln 10 for any batch: the head
  # starts at zero), so agreement there means the same batches and the same updates.
  assert reference[3]["train/loss"] < reference[1]["train/loss"] - 1e-3
  for name, got in layouts.items():
    for step in (1, 2, 3):
      for key in ("train/loss", "train/grad_norm", "train/accuracy"):
        _same(got[step][key], reference[step][key], f"{name} step {step} {key}")
    _same(got[3]["eval/loss"], reference[3]["eval/loss"], f"{name} eval/loss")
    assert got[3]["eval/num_examples"] == 355


# ------------------------------------------------------------------ preemption
@pytest.mark.multiprocess
def test_sigterm_stops_every_process_at_one_step_with_a_checkpoint(preempted_run):
  logs = preempted_run["logs"]
  assert preempted_run["codes"] == [0, 0], [log[-2000:] for log in logs]
  steps = [_stop_step(log) for log in logs]
  assert steps[0] == steps[1] and steps[0] > 3, steps
  assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]
  workdir, step = preempted_run["workdir"], steps[0]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  assert not os.path.exists(os.path.join(workdir, "data_state"))  # The step is the position.
  assert max(_metrics(workdir)[0]) == step


@pytest.mark.multiprocess
def test_rerun_resumes_and_a_killed_process_stops_the_other(preempted_run):
  workdir = preempted_run["workdir"]
  step = _stop_step(preempted_run["logs"][0])
  pair = _Pair(workdir, _flags(preempted_run["data_dir"], num_train_steps=1000), "rerun")
  try:
    # Resumed: it continues from the checkpoint instead of starting over.
    _wait_for(lambda: "train/loss" in _metrics(workdir)[0].get(step + 2, {}), pair.procs,
              400, f"step {step + 2} of the resumed run")
    for i in range(2):
      assert f"Resumed from step {step}" in pair.log(i)
    pair.procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    code = pair.procs[0].wait(timeout=EXIT_BOUND_S + 60)
    elapsed = time.time() - start
  finally:
    pair.kill_leftovers()
  log = pair.log(0)
  assert code != 0, log[-2000:]
  assert elapsed < EXIT_BOUND_S, (elapsed, log[-2000:])
  assert ("Error: Process 0 of 2 stopped on a runtime error" in log
          or "JAX distributed service detected fatal errors" in log), log[-2000:]
  assert "Traceback" not in log, log[-3000:]


@pytest.mark.multiprocess
def test_run_stopped_under_two_processes_resumes_under_one(preempted_run, tmp_path):
  # After the tests above the workdir's newest checkpoint is the preemption step.
  workdir = preempted_run["workdir"]
  step = _stop_step(preempted_run["logs"][0])
  end = step + 2
  flags = _flags(preempted_run["data_dir"], num_train_steps=end, eval_every_steps=end)
  reference_dir = tmp_path / "uninterrupted"
  # The preempted run was started long (num_train_steps 1000) to be stopped; ending it
  # at `end` is a length change, accepted (the schedule is constant: _overrides).
  resumed, reference = run_mains(([f"--workdir={workdir}", "--accept_changes=num_train_steps"]
                                  + flags, _env(XLA_FLAGS="")),
                                 ([f"--workdir={reference_dir}"] + flags, _env(XLA_FLAGS="")))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {step}" in resumed.stderr
  assert reference.returncode == 0, reference.stderr[-3000:]
  got, want = _metrics(workdir)[0], _metrics(reference_dir)[0]
  for s in (step + 1, end):
    _same(got[s]["train/loss"], want[s]["train/loss"], f"step {s} train/loss")
  _same(got[end]["eval/loss"], want[end]["eval/loss"], "eval/loss")


# ------------------------------------------------------------------ unit checks
def test_runtime_failures_are_told_from_input_errors():
  from mixer_jax import distributed
  assert distributed.is_runtime_failure(ValueError(
      "UNKNOWN: Gloo AllReduce failed: Connection closed by peer [127.0.0.1]:4242"))
  assert distributed.is_runtime_failure(RuntimeError("UNAVAILABLE: Failed to send RPC"))
  assert not distributed.is_runtime_failure(ValueError(
      "config.batch_size=30 must be divisible by the 8 data-parallel devices."))
  with pytest.raises(ValueError, match="together"):
    distributed.initialize("localhost:1234", None, None)
