"""sharding.py: replicate, fsdp and a model axis on 8 simulated devices give the same
losses, with the parameter and optimiser shards the rules promise; a scanned model's
stacked blocks shard as the unrolled model's blocks do."""

import json
import subprocess
import sys

import jax
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
import numpy as np
from configs import default
from mixer_jax import checkpoint, train

overrides, root = json.loads(sys.argv[1]), sys.argv[2]
layouts = {"replicate": ("replicate", 1), "fsdp": ("fsdp", 1), "fsdp_model2": ("fsdp", 2)}
saved, out = {}, {}
original_save = checkpoint.TrainCheckpoints.save

def spy(self, step, state):  # The loop's real state, at its last step.
  saved[current] = {jax.tree_util.keystr(path): {
      "spec": [None if a is None else str(a) for a in leaf.sharding.spec],
      "shape": list(leaf.shape), "shard": list(leaf.addressable_shards[0].data.shape),
      "sum": float(np.sum(np.asarray(jax.device_get(leaf), np.float64)))}
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
  overrides = _overrides(digits_folder, num_train_steps=3, fsdp_min_size=64, randaugment_on="host",
                         train_flip=False, randaugment_layers=0)
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

  # This process has 1 device: evaluate, predict and export read the 8-device
  # checkpoints (sharded or not) whole.
  from mixer_jax import weights
  for name in ("replicate", "fsdp"):
    params, _ = weights.load_params(str(tmp_path / name))
    prefix = "['params']"
    saved = {k[len(prefix):]: a for k, a in out[name]["state"].items() if k.startswith(prefix)}
    loaded = {jax.tree_util.keystr(p): leaf
              for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert sorted(loaded) == sorted(saved)
    for key, leaf in loaded.items():
      assert list(leaf.shape) == saved[key]["shape"], key
      assert np.sum(leaf, dtype=np.float64) == pytest.approx(saved[key]["sum"], rel=1e-6), key
  # mesh_model=2: MLP hidden dims over `model`, fsdp over the 4-way `data` axis.
  model2 = out["fsdp_model2"]["state"]
  dense0 = [a for k, a in model2.items() if "Dense_0']['kernel']" in k]
  assert dense0 and all("model" in a["spec"] and "data" in a["spec"] for a in dense0)
  for a in dense0:
    assert np.prod(a["shard"]) * 8 == np.prod(a["shape"]), a




# ------------------------------------------------------- scanned blocks under fsdp
def test_stacked_parameters_keep_the_block_axis_whole_and_shard_like_one_block():
  from mixer_jax import sharding

  class Mesh8:  # param_spec reads only the axis sizes.
    shape = {sharding.DATA: 8, sharding.MODEL: 2}

  for path, shape in (("params/MixerBlock_3/token_mixing/Dense_0/kernel", (196, 384)),
                      ("params/MixerBlock_3/channel_mixing/Dense_1/kernel", (3072, 768)),
                      ("opt_state/[1]/mu/MixerBlock_3/token_mixing/Dense_0/bias", (384,)),
                      ("params/MixerBlock_3/LayerNorm_0/scale", (768,))):
    one = sharding.param_spec(path, shape, Mesh8, "fsdp", 2 ** 10)
    # 32 blocks: whole, and the rest as one block's (2^10 counts one block's elements).
    stacked = sharding.param_spec(path.replace("MixerBlock_3", "MixerBlock"), (32,) + shape,
                                  Mesh8, "fsdp", 2 ** 10, stacked=True)
    assert tuple(stacked) == (None,) + tuple(one), path
  assert tuple(sharding.param_spec("x/MixerBlock/b", (32, 24), Mesh8, "fsdp", 16,
                                   stacked=True)) == (None, "data")


_SCANNED_FSDP_SCRIPT = r"""
import json
import jax, numpy as np
from configs import default
from mixer_jax import sharding, state

c = default.get_config()
c.model.update(num_blocks=2, hidden_dim=16, tokens_mlp_dim=16, channels_mlp_dim=32, scan=True)
c.update(sharding="fsdp", fsdp_min_size=64, warmup_steps=0, lr_decay="constant",
         learning_rate=0.03, batch_size=16)
rng = np.random.default_rng(0)
local = {"image": rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
         "label": rng.integers(0, 10, 16).astype(np.int32)}
out = {}
for n in (1, 8):
  mesh = sharding.make_mesh(1, jax.devices()[:n])
  setup = state.Setup(c, 10, total_steps=10, mesh=mesh)
  train_step = setup.train_step()
  batch = sharding.global_batch(local, mesh)
  st = setup.init_state()
  step = train_step.lower(st, batch).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  losses = []
  for _ in range(3):
    st, metrics = step(st, batch)
    losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
  shards = lambda tree: {jax.tree_util.keystr(p): [list(a.sharding.spec), list(a.shape),
                                                   list(a.addressable_shards[0].data.shape)]
                         for p, a in jax.tree_util.tree_leaves_with_path(tree)}
  out[n] = {"losses": losses, "state": shards(st)}
  # The unrolled model's per-device bytes under the same rules, from shapes alone.
  c.model.scan = False
  unrolled = state.Setup(c, 10, total_steps=10, mesh=mesh).abstract_state
  c.model.scan = True
  nbytes = lambda tree: sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
                            for a in jax.tree_util.tree_leaves(tree))
  out[n]["bytes"] = [nbytes(setup.abstract_state), nbytes(unrolled)]

# Token-mixing kernels (16 tokens x 12) sharded on their contracted token axis, batch
# 128 with full remat: XLA's temporaries with and without the batch constraint.
c.model.update(tokens_mlp_dim=12, remat_policy="full")
c.update(fsdp_min_size=0, batch_size=128)
temps = []
for constrain in (True, False):
  if not constrain:
    sharding.batch_constraint = lambda mesh: (lambda x: x)
  setup = state.Setup(c, 10, mesh=sharding.make_mesh(1))
  compiled = setup.train_step().lower(setup.abstract_state, setup.abstract_batch(128)).compile()
  temps.append(compiled.memory_analysis().temp_size_in_bytes)
out["temporaries"] = temps
print("RESULT " + json.dumps(out))
"""


def test_scanned_model_under_fsdp_gives_the_same_losses_on_1_and_8_devices():
  result = subprocess.run([sys.executable, "-c", _SCANNED_FSDP_SCRIPT], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])
  one, eight = out["1"], out["8"]
  for step, (a, b) in enumerate(zip(one["losses"], eight["losses"])):
    _same(b, a, f"step {step + 1} loss, grad_norm")
  assert one["losses"][0] != one["losses"][2]  # The steps train.
  # Each device holds what it would for the unrolled model: the same bytes.
  assert eight["bytes"][0] == eight["bytes"][1] < one["bytes"][0] / 4
  stacked = {k: a for k, a in eight["state"].items() if "['MixerBlock']" in k}
  assert stacked and all(a[0][0] is None for a in stacked.values())  # Block axis whole.
  split = [a for a in stacked.values() if "data" in a[0]]
  assert len(split) >= 3 * 4  # params, mu, nu of the 4 block kernels at least.
  # Pinning the tokens' batch axis keeps the loop data-parallel (sharding.batch_constraint):
  # without it XLA gathers the batch around the token-sharded kernels.
  constrained, free = out["temporaries"]
  assert free > 2 * constrained, out["temporaries"]
  for spec, shape, shard in split:
    assert np.prod(shard) * 8 == np.prod(shape) and shard[0] == shape[0]
