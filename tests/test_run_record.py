"""run_record.py (the workdir's config.json and what a resume may change),
workdir_lock.py (one live run per workdir), configs/recorded.py (a workdir reproduces
its run), and the identity checks of train.py (init_from's architecture, finished
runs, Ctrl-C)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_config
from configs import common
from configs import recorded
from mixer_jax import errors
from mixer_jax import metrics
from mixer_jax import run_record
from mixer_jax import state
from mixer_jax import train
from mixer_jax import workdir_lock


def _record(tmp_path, **overrides):
  c = common.base_config()
  for k, v in overrides.items():
    c[k] = v
  start = run_record.start_entry(0, 1, 1, "cpu")
  return c, run_record.write(str(tmp_path), c, start)


def test_record_holds_every_key_command_versions_and_devices(tmp_path):
  c, written = _record(tmp_path)
  record = run_record.read(str(tmp_path))
  assert record == json.loads(json.dumps(written))
  assert set(record["config"]) == set(run_record.flat_config(common.base_config()))
  start = record["starts"][0]
  assert start["command"] == sys.argv and start["devices"] == 1 and start["processes"] == 1
  assert {"jax", "flax", "optax", "numpy", "python"} <= set(start["versions"])


def test_resume_refuses_run_changing_keys_naming_old_and_new(tmp_path):
  c, record = _record(tmp_path)
  c.batch_size, c.model.hidden_dim, c.seed = 64, 32, 3
  with pytest.raises(errors.WorkdirError) as e:
    run_record.check_resume(record, c, [], str(tmp_path))
  message = str(e.value)
  assert "batch_size: 4096 -> 64" in message and "model.hidden_dim: None -> 32" in message
  assert "seed: 0 -> 3" in message
  assert "--accept_changes=batch_size,model.hidden_dim,seed" in message
  # Accepted deliberately, key by key or all at once.
  found = run_record.check_resume(record, c, ["batch_size", "model.hidden_dim", "seed"],
                                  str(tmp_path))
  assert found["batch_size"] == (4096, 64)
  assert run_record.check_resume(record, c, ["all"], str(tmp_path))
  with pytest.raises(errors.ConfigError, match="does not change"):
    run_record.check_resume(record, c, ["dataset"], str(tmp_path))


def test_resume_allows_extending_observing_and_execution_changes(tmp_path):
  c, record = _record(tmp_path)
  c.num_train_steps, c.eval_every_steps, c.log_every_steps = 99, 7, 3
  c.sharding, c.mesh_model, c.model.kernels = "fsdp", 2, "xla"
  found = run_record.check_resume(record, c, [], str(tmp_path))
  assert set(found) == {"num_train_steps", "eval_every_steps", "log_every_steps",
                        "sharding", "mesh_model", "model.kernels"}


def test_keys_gained_at_their_default_or_lost_since_the_record_are_not_changes(tmp_path):
  c, record = _record(tmp_path)
  del record["config"]["cutmix_alpha"]    # A key added after the record was written.
  record["config"]["model.remat"] = True  # A key since removed.
  assert run_record.check_resume(record, c, [], str(tmp_path)) == {}
  c.cutmix_alpha = 0.5  # Not the default: the run would change.
  with pytest.raises(errors.WorkdirError, match=r"cutmix_alpha: None -> 0.5"):
    run_record.check_resume(record, c, [], str(tmp_path))


def test_unreadable_record_is_one_sentence(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(errors.WorkdirError, match="not a readable run record"):
    run_record.read(str(tmp_path))


def test_recorded_config_reproduces_the_config(tmp_path):
  c, _ = _record(tmp_path, batch_size=48, fewshot_shots=(2, 3))
  again = recorded.get_config(str(tmp_path))
  assert again.to_dict() == c.to_dict()
  with pytest.raises(ValueError, match="does not exist"):
    recorded.get_config(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- the lock
HOLD = """
import sys, time
from mixer_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(workdir):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  proc = _holder(str(tmp_path))
  try:
    with pytest.raises(errors.WorkdirError) as e:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert f"pid {proc.pid} on host" in str(e.value) and "in use by another run" in str(e.value)
  finally:
    proc.kill()
    proc.wait()
  # A lock left by a killed run is taken over.
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert (tmp_path / "run.lock").read_text() == ""


# --------------------------------------------------- train.py's identity checks
CHECKPOINT_INFO = dict(model=dict(patch_size=2, num_blocks=2, hidden_dim=16,
                                  tokens_mlp_dim=16, channels_mlp_dim=32),
                       num_classes=10, image_size=8, variant="S/2")


def test_init_from_takes_the_architecture_unless_the_config_sets_it(data_dir):
  config = tiny_config(data_dir)
  for key in CHECKPOINT_INFO["model"]:
    config.model[key] = None
  config.model.variant, config.image_size = "", 0
  state.resolve_model(config, CHECKPOINT_INFO, "/w")
  assert config.model.name == "Mixer custom (patch 2, 2 x 16)" and config.image_size == 8
  assert {k: config.model[k] for k in CHECKPOINT_INFO["model"]} == CHECKPOINT_INFO["model"]
  # A variant that disagrees: one sentence naming both values.
  config = tiny_config(data_dir)
  config.model.hidden_dim = None
  config.model.variant = "B/16"
  config.model.patch_size = 2
  with pytest.raises(errors.CheckpointError,
                     match=r"hidden_dim=768 \(variant B/16\) but init_from /w was trained "
                           r"with hidden_dim=16 \(variant S/2\)"):
    state.resolve_model(config, CHECKPOINT_INFO, "/w")


def test_progress_eta_counts_training_time_only():
  assert [metrics.format_seconds(s) for s in (9.4, 125, 7300)] == ["9s", "2m05s", "2h01m"]
  progress = metrics.Progress(total_steps=4, every_steps=2)
  progress(1)
  with progress.paused():
    time.sleep(0.2)  # An evaluation: not training time.
  progress(2)
  assert progress._paused >= 0.2


def test_ctrl_c_saves_then_exits_130(
    data_dir, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "w")
  should_stop = train.PreemptionWatcher.should_stop

  def press_ctrl_c_at_step_2(self, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return should_stop(self, step)

  monkeypatch.setattr(train.PreemptionWatcher, "should_stop", press_ctrl_c_at_step_2)
  config = tiny_config(data_dir, num_train_steps=8, checkpoint_every_steps=100,
                       eval_every_steps=100)
  with pytest.raises(errors.Interrupted, match="checkpoint saved at step 4") as e:
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  with pytest.raises(SystemExit) as exit_:
    errors.run_guarded(lambda: (_ for _ in ()).throw(e.value))
  assert exit_.value.code == errors.INTERRUPTED
  assert capsys.readouterr().err.strip() == ("Interrupted: checkpoint saved at step 4; run "
                                             "the same command to resume.")
