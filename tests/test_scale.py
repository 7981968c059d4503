"""Scale-out: process layouts, sharding strategies, preemption, a dying process, memory.

Same global batch in every layout: each process reads its own shard of the data, so
the runs read a `folder:` dataset (process i of n takes every n-th file of one fixed
order) with shuffle_buffer=1 and no random augmentation. With 64 training images and
batch 32, step k's global batch is the same 32 files in every layout (2 processes x 1
device, 1 x 2, 1 x 1); only their order inside the batch differs, and the loss is a
batch mean, so losses agree to float rounding. Evaluation sees each test image once
in every layout. The learning rate is constant (no warmup), so runs of different
lengths take identical first steps.
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

from conftest import REPO, run_main

TINY = dict(num_blocks=2, hidden_dim=16, tokens_mlp_dim=16, channels_mlp_dim=32)
HEARTBEAT_S = 5
# A survivor exits within the heartbeat timeout plus a few seconds (distributed.py);
# the margin covers a loaded 2-core test machine.
EXIT_BOUND_S = HEARTBEAT_S + 25


def _overrides(folder, **extra):
  flags = dict(dataset=f"folder:{folder}", train_split="train", eval_split="test",
               shuffle_buffer=1, batch_size=32, warmup_steps=0, lr_decay="constant",
               log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=1000,
               log_image_grid=False, **{f"model.{k}": v for k, v in TINY.items()})
  flags.update(extra)
  return flags


def _flags(folder, **extra):
  return [f"--config.{k}={v}" for k, v in _overrides(folder, **extra).items()]


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

  def __init__(self, workdir, folder, extra_flags, tag):
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
def digits_folder(tmp_path_factory):
  """64 train and 40 test 8x8 digits as PNGs in class folders (offline, < 1 s)."""
  from PIL import Image
  from sklearn.datasets import load_digits
  digits = load_digits()
  pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
  root = tmp_path_factory.mktemp("digits_folder")
  for split, indices in (("train", range(64)), ("test", range(64, 104))):
    for i in indices:
      folder = root / split / str(digits.target[i])
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(pixels[i]).convert("RGB").save(folder / f"{i:04d}.png")
  return str(root)


@pytest.fixture(scope="module")
def preempted_run(digits_folder, tmp_path_factory):
  """A 2-process run, SIGTERM to process 1 once step 3 is evaluated."""
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  pair = _Pair(workdir, digits_folder, _flags(digits_folder, num_train_steps=1000), "first")
  try:
    _wait_for(lambda: "eval/loss" in _metrics(workdir)[0].get(3, {}), pair.procs, 400,
              "the evaluation at step 3")
    pair.procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=180) for p in pair.procs]
  finally:
    pair.kill_leftovers()
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  return {"workdir": str(workdir), "codes": codes, "logs": [pair.log(0), pair.log(1)],
          "pids": [p.pid for p in pair.procs], "events": events}


def _stop_step(log):
  lines = [l for l in log.splitlines() if "Preempted: checkpoint saved at step" in l]
  assert len(lines) == 1, log[-3000:]
  return int(lines[0].split("at step ")[1].split(";")[0])


def _same(a, b, what):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=what)


# ---------------------------------------------------------------- layouts agree
@pytest.mark.multiprocess
def test_two_processes_two_devices_one_device_agree(preempted_run, digits_folder,
                                                     tmp_path):
  two_procs, rows = _metrics(preempted_run["workdir"])
  # Only process 0 writes metrics (one row per step and kind) and TensorBoard events.
  train_rows = [r["step"] for r in rows if "train/loss" in r]
  assert train_rows == sorted(set(train_rows)), train_rows
  events = preempted_run["events"]
  assert len(events) == 1 and f".{preempted_run['pids'][0]}." in events[0], events
  layouts = {"2 processes x 1 device": two_procs}
  for name, env in (("1 process x 2 devices",
                     {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
                    ("1 process x 1 device", {"XLA_FLAGS": ""})):
    workdir = tmp_path / name.replace(" ", "_")
    result = run_main([f"--workdir={workdir}"] + _flags(digits_folder, num_train_steps=3),
                      env_extra=dict(_env(**env)), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    layouts[name] = _metrics(workdir)[0]

  reference = layouts["1 process x 1 device"]
  # Steps 2-3 follow real updates (step 1's loss is ln 10 for any batch: the head
  # starts at zero), so agreement there means the same batches and the same updates.
  assert reference[3]["train/loss"] < reference[1]["train/loss"] - 1e-3
  for name, got in layouts.items():
    for step in (1, 2, 3):
      for key in ("train/loss", "train/grad_norm", "train/accuracy"):
        _same(got[step][key], reference[step][key], f"{name} step {step} {key}")
    _same(got[3]["eval/loss"], reference[3]["eval/loss"], f"{name} eval/loss")
    assert got[3]["eval/num_examples"] == 40


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
  for i in range(2):
    assert os.path.isdir(os.path.join(workdir, "data_state", str(step), f"process_{i}"))
  assert max(_metrics(workdir)[0]) == step


@pytest.mark.multiprocess
def test_rerun_resumes_and_a_killed_process_stops_the_other(preempted_run, digits_folder):
  workdir = preempted_run["workdir"]
  step = _stop_step(preempted_run["logs"][0])
  pair = _Pair(workdir, digits_folder, _flags(digits_folder, num_train_steps=1000), "rerun")
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


# ------------------------------------------------------------- fsdp, mesh_model
_SHARDING_SCRIPT = r"""
import json, sys
import jax
from configs import default
from mixer_jax import train

overrides, root = json.loads(sys.argv[1]), sys.argv[2]
layouts = {"replicate": ("replicate", 1), "fsdp": ("fsdp", 1), "fsdp_model2": ("fsdp", 2)}
saved, out = {}, {}
original_save = train.TrainCheckpoints.save

def spy(self, step, state, data_iterator):  # The loop's real state, at its last step.
  saved[current] = {jax.tree_util.keystr(path): {
      "spec": [None if a is None else str(a) for a in leaf.sharding.spec],
      "shape": list(leaf.shape), "shard": list(leaf.addressable_shards[0].data.shape)}
      for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  return original_save(self, step, state, data_iterator)

train.TrainCheckpoints.save = spy
for current, (strategy, mesh_model) in layouts.items():
  c = default.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.sharding, c.mesh_model = strategy, mesh_model
  train.train_and_evaluate(c, f"{root}/{current}")
  rows = {}
  for line in open(f"{root}/{current}/metrics.jsonl"):
    row = json.loads(line)
    rows.setdefault(row["step"], {}).update(row)
  out[current] = {"metrics": rows, "state": saved[current]}
print("RESULT " + json.dumps(out))
"""


def test_fsdp_and_model_axis_match_replicate_on_8_devices(digits_folder, tmp_path):
  overrides = _overrides(digits_folder, num_train_steps=3, fsdp_min_size=64)
  result = subprocess.run(
      [sys.executable, "-c", _SHARDING_SCRIPT, json.dumps(overrides), str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=400,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])

  reference = out["replicate"]["metrics"]
  for name in ("fsdp", "fsdp_model2"):
    got = out[name]["metrics"]
    for step in ("1", "2", "3"):
      for key in ("train/loss", "train/grad_norm"):
        _same(got[step][key], reference[step][key], f"{name} step {step} {key}")
    _same(got["3"]["eval/loss"], reference["3"]["eval/loss"], f"{name} eval/loss")

  # replicate: every array whole on every device.
  assert all(not any(a["spec"]) for a in out["replicate"]["state"].values())
  # fsdp: params and Adam moments of >= fsdp_min_size elements split 8 ways over `data`.
  fsdp = out["fsdp"]["state"]
  big = {k: a for k, a in fsdp.items() if np.prod(a["shape"]) >= 64}
  assert len(big) >= 3 * 8, sorted(big)  # params, mu, nu of >= 8 kernels.
  assert any(".mu[" in k for k in big) and any(".nu[" in k for k in big), sorted(big)
  for key, a in big.items():
    assert a["spec"].count("data") == 1, (key, a)
    assert np.prod(a["shard"]) * 8 == np.prod(a["shape"]), (key, a)
  small = [a for a in fsdp.values() if np.prod(a["shape"]) < 64]
  assert small and all(not any(a["spec"]) for a in small)
  # mesh_model=2: MLP hidden dims over `model`, fsdp over the 4-way `data` axis.
  model2 = out["fsdp_model2"]["state"]
  dense0 = [a for k, a in model2.items() if "Dense_0']['kernel']" in k]
  assert dense0 and all("model" in a["spec"] and "data" in a["spec"] for a in dense0)
  for a in dense0:
    assert np.prod(a["shard"]) * 8 == np.prod(a["shape"]), a


# ----------------------------------------------------------------- memory tool
def test_memory_tool_fsdp_divides_parameter_and_optimizer_bytes():
  wrapper = ("import runpy, sys\n"
             "sys.argv = ['mixer_jax.memory'] + sys.argv[1:]\n"
             "try:\n"
             "  runpy.run_module('mixer_jax.memory', run_name='__main__')\n"
             "finally:\n"
             "  print('TENSORFLOW_IMPORTED', 'tensorflow' in sys.modules)\n")
  args = ["--config=configs/default.py", "--num_devices=8", "--num_classes=10",
          "--config.fsdp_min_size=0"] + [f"--config.model.{k}={v}" for k, v in TINY.items()]
  result = subprocess.run([sys.executable, "-c", wrapper] + args, cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == "TENSORFLOW_IMPORTED False"
  report = json.loads(lines[-2])
  assert report["header"]["num_devices"] == 8 and report["header"]["per_device_batch"] == 16
  rows = {r["strategy"]: r for r in report["rows"]}
  replicate, fsdp = rows["replicate"], rows["fsdp"]
  # Only the step counter and arrays with no dimension divisible by 8 (the 10-class
  # head bias) stay whole: ~8-fold.
  ratio = replicate["params_plus_opt"] / fsdp["params_plus_opt"]
  assert 7 < ratio <= 8, ratio
  # Adam's mu and nu, plus two step counters.
  assert replicate["opt_state"] == 2 * replicate["params"] + 8
  for row in (replicate, fsdp):
    assert row["arguments"] == row["arguments_computed"]  # XLA agrees with the shardings.
    assert row["temporaries"] > 0 and row["batch"] == 16 * (8 * 8 * 3 * 4 + 4)
  assert "params_plus_opt" in lines[1] and lines[2].startswith("replicate")


def test_memory_simulation_env_replaces_device_count():
  from mixer_jax import memory
  env = memory.simulation_env(256, {"XLA_FLAGS": "--xla_foo=1 "
                                    "--xla_force_host_platform_device_count=2"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=256"
  assert env["JAX_PLATFORMS"] == "cpu"


# ------------------------------------------------------------------ unit checks
def test_preemption_watcher_agrees_lag_steps_after_the_signal():
  import jax
  from mixer_jax import sharding, train
  watcher = train.PreemptionWatcher(sharding.make_mesh(1, jax.devices()[:1]))
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    answers = [watcher.should_stop(s) for s in range(2, 2 + watcher.LAG + 2)]
  finally:
    watcher.close()
  # Checks already in flight say "go on"; the first one dispatched after the signal
  # stops the run, LAG steps later.
  assert answers == [False] * watcher.LAG + [True, True]


def test_runtime_failures_are_told_from_input_errors():
  from mixer_jax import distributed
  assert distributed.is_runtime_failure(ValueError(
      "UNKNOWN: Gloo AllReduce failed: Connection closed by peer [127.0.0.1]:4242"))
  assert distributed.is_runtime_failure(RuntimeError("UNAVAILABLE: Failed to send RPC"))
  assert not distributed.is_runtime_failure(ValueError(
      "config.batch_size=30 must be divisible by the 8 data-parallel devices."))
  with pytest.raises(ValueError, match="together"):
    distributed.initialize("localhost:1234", None, None)
