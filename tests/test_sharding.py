"""sharding.py: replicate, fsdp and a model axis on 8 simulated devices give the same
losses, with the parameter and optimiser shards the rules promise."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_distributed import _env, _overrides, _same


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


# ------------------------------------------------------------- fsdp, mesh_model
_SHARDING_SCRIPT = r"""
import json, sys
import jax
from configs import default
from mixer_jax import checkpoint, train

overrides, root = json.loads(sys.argv[1]), sys.argv[2]
layouts = {"replicate": ("replicate", 1), "fsdp": ("fsdp", 1), "fsdp_model2": ("fsdp", 2)}
saved, out = {}, {}
original_save = checkpoint.TrainCheckpoints.save

def spy(self, step, state):  # The loop's real state, at its last step.
  saved[current] = {jax.tree_util.keystr(path): {
      "spec": [None if a is None else str(a) for a in leaf.sharding.spec],
      "shape": list(leaf.shape), "shard": list(leaf.addressable_shards[0].data.shape)}
      for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  return original_save(self, step, state)

checkpoint.TrainCheckpoints.save = spy
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


@pytest.mark.slow
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


