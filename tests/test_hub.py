"""`hf-hub:` weight names, offline, from a hub cache the tests build themselves.

The cache holds tiny timm-layout files of all three families (tests/fixtures, 16 px,
5 classes) under the hub repository names users type; the names are only cache keys
here, so the files are small, and `HF_HUB_OFFLINE` keeps every call off the network.
Each entry point must give from the hub name exactly what it gives from the local path.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, read_metrics
from mixer_jax import errors, evaluate, export, hub, predict, train, weights
from test_evaluate import config_for, write_folder
from test_timm_layout import FAMILIES, _fixture

REPOS = {"mixer": "timm/mixer_b16_224.goog_in21k_ft_in1k",
         "resmlp": "timm/resmlp_12_224.fb_in1k",
         "gmlp": "timm/gmlp_s16_224.ra3_in1k"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """HF_HOME with a hub cache of the three families' files; returns (HF_HOME, paths)."""
  home = tmp_path_factory.mktemp("hf_home")
  local = {}
  for family, repo in REPOS.items():
    local[family] = _fixture(family)[0]
    with open(local[family], "rb") as f:
      hub.cache_entry(str(home / "hub"), repo, f.read())
  return str(home), local


@pytest.fixture
def offline(cache, monkeypatch):
  """huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at import: set both there."""
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(cache[0], "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  d = tmp_path_factory.mktemp("hub_images")
  rng = np.random.default_rng(0)
  paths = []
  for i in range(2):
    paths.append(str(d / f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[-1])
  return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_predict_evaluate_export_from_a_hub_name(family, offline, images, tmp_path):
  name, path = f"hf-hub:{REPOS[family]}", offline[family]
  from_hub, info = weights.load_params(name)
  from_file, file_info = weights.load_params(path)
  assert info == file_info and info["family"] == family
  for key, value in weights.flatten(from_file).items():
    np.testing.assert_array_equal(weights.flatten(from_hub)[key], value, err_msg=key)
  # A pinned revision reads the same cache entry.
  assert weights.load_params(f"{name}@main")[1] == info
  assert predict.predict(name, images) == predict.predict(path, images)
  root = write_folder(str(tmp_path / "data"), 5, 2)
  config = config_for(f"folder:{root}", eval_split="validation", eval_preprocess="resize")
  hub_eval = evaluate.evaluate(config, name)
  file_eval = evaluate.evaluate(config, path)
  for key in ("top1", "loss", "num_examples"):
    assert hub_eval[key] == file_eval[key], key
  export.export(name, "npz", str(tmp_path / "hub.npz"))
  export.export(path, "npz", str(tmp_path / "file.npz"))
  with np.load(tmp_path / "hub.npz") as a, np.load(tmp_path / "file.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def _finetune(tmp_path, init_from, family):
  from configs import finetune
  root = str(tmp_path / "data")
  if not os.path.isdir(root):
    write_folder(root, 3, 4)
  c = finetune.get_config(f"folder:{root}")
  c.init_from = init_from
  c.batch_size, c.num_train_steps, c.warmup_steps = 8, 2, 0
  c.eval_every_steps = c.log_every_steps = c.checkpoint_every_steps = 2
  workdir = str(tmp_path / f"work_{family}_{init_from.startswith('hf-hub:')}")
  final = train.train_and_evaluate(c, workdir)
  return final, read_metrics(workdir), workdir


@pytest.mark.slow
def test_finetuning_from_a_hub_name_is_fine_tuning_from_the_file(offline, tmp_path):
  """The Mixer from both sources, the same run; ResMLP and gMLP from the hub run too
  (their weights are those of the file, as the test above shows)."""
  from_hub, rows, workdir = _finetune(tmp_path, f"hf-hub:{REPOS['mixer']}", "mixer")
  from_file, file_rows, _ = _finetune(tmp_path, offline["mixer"], "mixer")
  assert from_hub == from_file
  assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == \
      [{k: v for k, v in r.items() if k != "time"} for r in file_rows]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["config"]["init_from"] == f"hf-hub:{REPOS['mixer']}"  # As typed.
  for family in ("resmlp", "gmlp"):
    final, _, workdir = _finetune(tmp_path, f"hf-hub:{REPOS[family]}", family)
    assert final["num_examples"] > 0 and np.isfinite(final["loss"])


def test_an_uncached_name_offline_is_one_sentence(offline):
  with pytest.raises(errors.CheckpointError) as e:
    weights.load_params("hf-hub:timm/mixer_l16_224.goog_in21k")
  message = str(e.value)
  assert message.startswith("hf-hub:timm/mixer_l16_224.goog_in21k: timm/mixer_l16_224."
                            "goog_in21k's model.safetensors at revision main is not in the "
                            "local cache (")
  assert "HF_HUB_OFFLINE is set" in message and "\n" not in message
  assert "`hf download timm/mixer_l16_224.goog_in21k model.safetensors`" in message
  with pytest.raises(errors.CheckpointError, match="not a hub name"):
    weights.load_params("hf-hub:mixer_b16")


def _cli(module, *args, home):
  env = dict(os.environ, HF_HOME=home, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("HF_HUB_CACHE", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)


def test_the_command_line_honours_hf_home_and_offline(cache, images, tmp_path):
  home, local = cache
  hub_run = _cli("mixer_jax.predict", f"--checkpoint=hf-hub:{REPOS['gmlp']}", *images,
                 home=home)
  assert hub_run.returncode == 0, hub_run.stderr[-2000:]
  assert json.loads(hub_run.stdout.splitlines()[-1]) == json.loads(json.dumps(
      predict.predict(local["gmlp"], images)))  # The local file, in this process.
  # Without the cache: exit 2 and one sentence, nothing else on stdout.
  empty = str(tmp_path / "empty_home")
  shutil.copytree(home, empty, ignore=shutil.ignore_patterns("models--*"))
  missing = _cli("mixer_jax.predict", f"--checkpoint=hf-hub:{REPOS['gmlp']}", *images,
                 home=empty)
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  lines = [l for l in missing.stderr.splitlines() if "hf-hub:" in l]
  assert len(lines) == 1 and "is not in the local cache" in lines[0], missing.stderr
