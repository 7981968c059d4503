"""paths.py: paths resolved once at the entry points; a run started through relative
paths trains, saves and resumes like one started through absolute ones."""

import os
import subprocess
import sys
import types

from conftest import REPO, config_flags, read_metrics, tiny_config
from mixer_jax import paths


def test_resolve_expands_home_and_makes_relative_paths_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", "/home/someone")
  assert paths.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.resolve("~/x") == "/home/someone/x"
  assert paths.resolve("/abs/x") == "/abs/x"
  assert paths.resolve("") == "" and paths.resolve("gs://bucket/x") == "gs://bucket/x"


def test_resolve_config_changes_only_path_keys(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  config = {"data_dir": "tfds", "manual_dir": "", "init_from": "/abs/a.npz",
            "dataset": "folder:images", "batch_size": 8}
  changed = paths.resolve_config(config)
  assert changed == {"data_dir": str(tmp_path / "tfds"),
                     "dataset": f"folder:{tmp_path / 'images'}"}
  assert config["batch_size"] == 8 and config["init_from"] == "/abs/a.npz"
  tfds_name = {"dataset": "mixer_digits", "data_dir": ""}
  assert paths.resolve_config(tfds_name) == {} and tfds_name["dataset"] == "mixer_digits"


def test_relative_workdir_and_data_dir_train_save_and_resume(data_dir, tmp_path, monkeypatch):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  relative_data = os.path.relpath(data_dir, tmp_path)
  cmd = ([sys.executable, "-m", "mixer_jax.main", f"--config={REPO}/configs/default.py",
          "--workdir=runs/x"] + config_flags(relative_data))
  first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"Workdir: {tmp_path / 'runs' / 'x'}" in first.stderr
  assert sorted(os.listdir(tmp_path / "runs" / "x" / "checkpoints")) == ["2", "4"]

  # The same relative paths again, resolved as main does at entry, in this process (a
  # second command would cost a process start): the run resumes from step 4.
  from mixer_jax import train
  monkeypatch.chdir(tmp_path)
  config = tiny_config(relative_data, num_train_steps=6)
  paths.resolve_config(config)
  train.train_and_evaluate(config, paths.resolve("runs/x"), ["num_train_steps"])
  train_steps = [r["step"] for r in read_metrics("runs/x") if "train/loss" in r]
  assert train_steps == [2, 4, 6]  # Step 2 logged once: it resumed, it did not start over.
  assert not (tmp_path / "runs" / "x" / "unreadable_checkpoints").exists()
