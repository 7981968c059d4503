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
from mixer_jax import workdir as workdir_lib
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
  c.eval_every_steps, c.log_every_steps = 7, 3
  c.sharding, c.mesh_model, c.model.kernels = "fsdp", 2, "xla"
  found = run_record.check_resume(record, c, [], str(tmp_path))
  assert set(found) == {"eval_every_steps", "log_every_steps",
                        "sharding", "mesh_model", "model.kernels"}


def test_run_length_is_refused_saying_the_learning_rate_it_would_give(tmp_path):
  """The finished 600-step digits run resumed with 1200 steps: refused, naming the rate
  the resume step would get under the rebuilt schedule (README's number)."""
  from configs import default
  c = default.get_config()
  record = run_record.write(str(tmp_path), c, run_record.start_entry(0, 1, 1, "cpu"))
  c.num_train_steps = 1200
  with pytest.raises(errors.WorkdirError) as e:
    run_record.check_resume(record, c, [], str(tmp_path), 600, workdir_lib.scheduled_rate)
  assert str(e.value) == (
      f"Resuming {tmp_path} with a config that changes the run (num_train_steps: 600 -> "
      "1200: accepting it rebuilds the learning-rate schedule over the new length, so the "
      "rate at the resume step 600 becomes 0.001713 instead of the recorded schedule's 0 "
      "(a warm restart, not a continuation)); use the recorded config "
      f"({tmp_path}/config.json), a new --workdir, or accept it deliberately with "
      "--accept_changes=num_train_steps.")
  assert "1.713e-03" in (REPO and open(os.path.join(REPO, "README.md")).read())
  assert run_record.check_resume(record, c, ["num_train_steps"], str(tmp_path))[
      "num_train_steps"] == (600, 1200)
  # An epoch count is refused too (its total is known only with the data)...
  c.num_train_steps, c.num_epochs = 0, 2.0
  with pytest.raises(errors.WorkdirError, match=r"the rate jumps at the resume step"):
    run_record.check_resume(record, c, [], str(tmp_path), 600, workdir_lib.scheduled_rate)
  # ...but not where a fixed step count makes it unread.
  c.num_train_steps = 600
  assert run_record.check_resume(record, c, [], str(tmp_path)) == {}


@pytest.mark.parametrize("content", ["dir", "[1, 2]", '{"config": 5}', '{"starts": []}',
                                     '{"config": {}, "starts": 3}'])
def test_malformed_record_is_one_sentence(tmp_path, content):
  path = tmp_path / "config.json"
  if content == "dir":
    path.mkdir()
  else:
    path.write_text(content)
  with pytest.raises(errors.WorkdirError, match=(
      r"config.json is not a readable run record \(\w+: .+\); restore it from a backup, "
      r"or move it aside \(a resume then checks the config its checkpoints carry\)\.$")):
    run_record.read(str(tmp_path))


def test_lost_record_is_checked_against_the_checkpoints_config(data_dir, tmp_path,
                                                                monkeypatch):
  """rm config.json, then resume with another seed and learning rate: refused (the
  newest checkpoint carries the config); the same config resumes and rewrites it."""
  from mixer_jax import checkpoint
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2, eval_every_steps=100),
                           workdir)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(errors.WorkdirError, match=r"\(learning_rate: 0.003 -> 0.01; seed: 0 "
                     r"-> 5\); use the recorded config"):
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2, seed=5,
                                         learning_rate=0.01), workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  assert checkpoint.saved_config(workdir)[0] == 2
  # Checkpoints from before configs were saved in them: refused unless all is accepted.
  monkeypatch.setattr(checkpoint, "saved_config", lambda w: (2, None))
  with pytest.raises(errors.WorkdirError, match=(
      r"has checkpoints \(newest step 2\) but no .*config.json, and they do not carry their "
      r"config, so this resume cannot be checked; restore config.json from a backup, or "
      r"accept this command's config as the run's record with --accept_changes=all\.")):
    workdir_lib.check_record(workdir, tiny_config(data_dir), [2], [])
  assert workdir_lib.check_record(workdir, tiny_config(data_dir), [2], ["all"]) == {}
  monkeypatch.undo()
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2, log_every_steps=1,
                                       eval_every_steps=100), workdir)
  assert run_record.read(workdir)["config"]["seed"] == 0  # Rewritten from the checked run.


def test_unreadable_checkpoints_do_not_restart_a_run_silently(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  config = lambda: tiny_config(data_dir, num_train_steps=2, eval_every_steps=100)
  train.train_and_evaluate(config(), workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)
  with pytest.raises(errors.WorkdirError) as e:
    train.train_and_evaluate(config(), workdir)
  aside = os.path.join(workdir, "unreadable_checkpoints")
  moved = os.path.join(aside, os.listdir(aside)[0])
  assert str(e.value) == (
      f"Workdir {workdir} cannot resume: every checkpoint was unreadable (moved step 2 to "
      f"{moved}), and starting over would silently make it another run; use a new "
      "--workdir, or start over here deliberately with --accept_changes=restart.")
  with pytest.raises(errors.WorkdirError, match=(
      r"cannot resume: its checkpoints were set aside as unreadable")):
    train.train_and_evaluate(config(), workdir)
  outcome = {}
  train.train_and_evaluate(config(), workdir, ["restart"], outcome)
  assert outcome["status"] == "finished" and outcome["step"] == 2


def test_keys_gained_at_their_default_or_lost_since_the_record_are_not_changes(tmp_path):
  c, record = _record(tmp_path)
  del record["config"]["cutmix_alpha"]    # A key added after the record was written.
  record["config"]["model.remat"] = True  # A key since removed.
  assert run_record.check_resume(record, c, [], str(tmp_path)) == {}
  c.cutmix_alpha = 0.5  # Not the default: the run would change.
  with pytest.raises(errors.WorkdirError, match=r"cutmix_alpha: None -> 0.5"):
    run_record.check_resume(record, c, [], str(tmp_path))


def test_randaugment_on_changed_on_resume_is_refused_unless_accepted(tmp_path):
  """Host and device augmentation draw different random numbers: another stream.
  Records written before the key existed augmented on the host."""
  c, record = _record(tmp_path, randaugment_on="host")
  c.randaugment_on = "device"
  with pytest.raises(errors.WorkdirError, match=r"randaugment_on: 'host' -> 'device'.*"
                     r"--accept_changes=randaugment_on"):
    run_record.check_resume(record, c, [], str(tmp_path))
  assert run_record.check_resume(record, c, ["randaugment_on"], str(tmp_path)) == {
      "randaugment_on": ("host", "device")}
  del record["config"]["randaugment_on"]
  with pytest.raises(errors.WorkdirError, match=r"randaugment_on: None -> 'device'"):
    run_record.check_resume(record, c, [], str(tmp_path))
  c.randaugment_on = "host"
  assert run_record.check_resume(record, c, [], str(tmp_path)) == {}


def test_randaugment_on_is_recorded_resolved_and_a_resume_may_not_change_it(data_dir,
                                                                             tmp_path):
  workdir = str(tmp_path / "run")
  config = lambda **o: tiny_config(data_dir, **{"num_train_steps": 2,
                                                "eval_every_steps": 2, **o})
  train.train_and_evaluate(config(), workdir)  # "auto": "host" on the CPU.
  assert run_record.read(workdir)["config"]["randaugment_on"] == "host"
  with pytest.raises(errors.WorkdirError, match=r"randaugment_on: 'host' -> 'device'"):
    train.train_and_evaluate(config(num_train_steps=3, randaugment_on="device"), workdir,
                             ["num_train_steps"])


def test_records_of_unresolved_model_fields_resume(tmp_path):
  """Records written before the model resolved its fields hold 0 for "the variant's
  own value" and no family or name: the same run while the variant is the same."""
  c, record = _record(tmp_path)
  state.resolve_model(c)
  for key in ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
    record["config"][f"model.{key}"] = 0
  for key in ("model.family", "model.name", "model.layerscale_init",
              "model.approximate_gelu"):
    record["config"].pop(key, None)
  assert run_record.check_resume(record, c, [], str(tmp_path)) == {}
  record["config"]["model.variant"] = "S/16"  # Another variant: its sizes were others.
  with pytest.raises(errors.WorkdirError, match=r"model.hidden_dim: 0 -> "):
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
  should_stop = workdir_lib.PreemptionWatcher.should_stop

  def press_ctrl_c_at_step_2(self, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return should_stop(self, step)

  monkeypatch.setattr(workdir_lib.PreemptionWatcher, "should_stop", press_ctrl_c_at_step_2)
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
