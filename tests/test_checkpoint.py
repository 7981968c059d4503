"""Checkpoint files: released `.npz` and timm `.safetensors` layouts, round trips,
merging, and one sentence per bad file; training checkpoints in the released block
layout whatever the model's (scanned or unrolled), restored into either."""

import os
import re
import zipfile

import jax
import numpy as np
import pytest

from mixer_jax import checkpoint
from mixer_jax import models
from mixer_jax import errors
from test_models import TINY, np_mixer_forward
from test_models import _random_params as random_params
from test_evaluate import SIZE as NPZ_SIZE, TINY as NPZ_TINY, write_checkpoint


def _tiny(num_classes=5, **kw):
  return models.from_preset("S/4", num_classes, **dict(TINY, **kw))


def _write_released_layout(path, params):
  """Writes the file the way a third party would: plain numpy, '/'-joined keys."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else key
      if isinstance(value, dict):
        visit(name, value)
      else:
        flat[name] = np.asarray(value)

  visit("", params)
  np.savez(path, **flat)
  return flat


def test_third_party_file_loads_and_matches_numpy_forward(tmp_path):
  model = _tiny(num_classes=7)
  params = random_params(model, 16, seed=3)
  flat = _write_released_layout(tmp_path / "Mixer-T_4.npz", params)
  assert "MixerBlock_1/token_mixing/Dense_0/kernel" in flat and "stem/kernel" in flat
  loaded = checkpoint.load_npz(str(tmp_path / "Mixer-T_4.npz"))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  logits = model.apply({"params": loaded}, images)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(logits, np_mixer_forward(images.astype(np.float64), p64, 4),
                             rtol=1e-4, atol=1e-4)


def test_npz_round_trip_is_lossless(tmp_path):
  params = random_params(_tiny(), 16, seed=4)
  path = str(tmp_path / "out.npz")
  checkpoint.save_npz(params, path)
  with np.load(path) as data:  # Same flat layout as the released files.
    assert sorted(data.files) == sorted(checkpoint.flatten(params))
  again = checkpoint.load_npz(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_describe_infers_the_architecture():
  info = checkpoint.describe(random_params(_tiny(), 16))
  assert info == dict(patch_size=4, hidden_dim=8, num_blocks=2, num_tokens=16,
                      tokens_mlp_dim=6, channels_mlp_dim=12, num_classes=5)


def test_load_params_of_npz_reports_model_info(tmp_path):
  path = str(tmp_path / "m.npz")
  checkpoint.save_npz(random_params(_tiny(), 16), path)
  _, info = checkpoint.load_params(path)
  assert info["model"] == TINY and info["num_classes"] == 5 and info["image_size"] == 16


def test_head_is_reinitialised_for_a_new_class_count():
  pretrained = random_params(_tiny(num_classes=5), 16, seed=5)
  fresh = models.init_params(_tiny(num_classes=3), 16)
  merged = checkpoint.load_pretrained(fresh, pretrained)
  np.testing.assert_array_equal(merged["head"]["kernel"], np.zeros((8, 3)))
  np.testing.assert_array_equal(merged["stem"]["kernel"], pretrained["stem"]["kernel"])
  # Same class count: the pretrained head is kept.
  same = checkpoint.load_pretrained(models.init_params(_tiny(num_classes=5), 16), pretrained)
  np.testing.assert_array_equal(same["head"]["kernel"], pretrained["head"]["kernel"])


def test_load_pretrained_of_a_released_npz_zeroes_the_new_head(tmp_path):
  """A 10-class released-layout `.npz` (non-zero head bias) into a 3-class model."""
  npz = checkpoint.load_npz(write_checkpoint(str(tmp_path / "c10.npz"), 10,
                                             bias=np.arange(10, dtype=np.float32)))
  model = models.from_preset("S/4", 3, **NPZ_TINY)
  fresh = models.init_params(model, NPZ_SIZE, jax.random.key(1))
  merged = checkpoint.flatten(checkpoint.load_pretrained(fresh, npz, source="c10.npz"))
  pre = checkpoint.flatten(npz)
  assert merged["head/kernel"].shape == (NPZ_TINY["hidden_dim"], 3)
  assert not np.any(merged["head/kernel"]) and not np.any(merged["head/bias"])
  assert set(merged) == set(pre)
  for k in merged:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(merged[k], pre[k])


def test_features_model_drops_the_checkpoint_head():
  pretrained = random_params(_tiny(num_classes=5), 16)
  fresh = models.init_params(_tiny(num_classes=0), 16)
  merged = checkpoint.load_pretrained(fresh, pretrained)
  assert "head" not in merged


def test_missing_key_is_named():
  pretrained = random_params(_tiny(), 16)
  del pretrained["MixerBlock_1"]["LayerNorm_1"]
  with pytest.raises(errors.CheckpointError, match="MixerBlock_1/LayerNorm_1/bias"):
    checkpoint.load_pretrained(models.init_params(_tiny(), 16), pretrained)


def test_wrong_shape_names_key_and_both_shapes():
  pretrained = random_params(_tiny(hidden_dim=10), 16)
  with pytest.raises(errors.CheckpointError,
                     match=r"MixerBlock_0/LayerNorm_0/bias has shape \(10,\) but the model "
                           r"expects \(8,\)"):
    checkpoint.load_pretrained(models.init_params(_tiny(), 16), pretrained)


def test_unexpected_key_is_named():
  pretrained = random_params(_tiny(num_blocks=3), 16)
  with pytest.raises(errors.CheckpointError, match="MixerBlock_2"):
    checkpoint.load_pretrained(models.init_params(_tiny(), 16), pretrained)


def test_truncated_npz_and_non_checkpoint_files(tmp_path):
  path = tmp_path / "good.npz"
  checkpoint.save_npz(random_params(_tiny(), 16), str(path))
  data = path.read_bytes()
  (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError, match="truncated.npz is not a readable"):
    checkpoint.load_npz(str(tmp_path / "truncated.npz"))
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(errors.CheckpointError, match="notes.txt is not a readable"):
    checkpoint.load_npz(str(tmp_path / "notes.txt"))
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    checkpoint.load_npz(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(errors.CheckpointError,
                     match="other.npz is not a Mixer checkpoint .it has no parameter stem/kernel"):
    checkpoint.load_params(str(tmp_path / "other.npz"))


# --- Files in: every problem is one sentence naming the file and the first key. ------

@pytest.fixture(scope="module")
def tiny_flat():
  return checkpoint.flatten(random_params(_tiny(), 16, seed=6))


def _bad_file(name, path, flat):
  """Writes the case `name` to `path`; returns the fragments its message must hold."""
  block = "MixerBlock_1/token_mixing/Dense_0/kernel"
  if name == "missing_key":
    np.savez(path, **{k: v for k, v in flat.items() if k != block})
    return [f"is missing parameter {block} (shape (16, 6)", "export or download it again"]
  if name == "missing_middle_block":
    np.savez(path, **{k.replace("MixerBlock_1/", "MixerBlock_2/"): v for k, v in flat.items()})
    return ["is missing parameter MixerBlock_1/LayerNorm_0/bias"]
  if name == "extra_key":
    np.savez(path, **flat, **{"MixerBlock_1/extra/kernel": np.zeros(3, np.float32)})
    return ["has parameter MixerBlock_1/extra/kernel (shape (3,)) that is not in the Mixer"]
  if name == "wrong_shape":
    np.savez(path, **{**flat, block: np.zeros((16, 5), np.float32)})
    return [f"parameter {block} has shape (16, 5) but the Mixer", "expects (16, 6)"]
  if name == "integer_dtype":
    np.savez(path, **{**flat, block: flat[block].astype(np.int32)})
    return [f"parameter {block} has dtype int32, not a floating-point type"]
  if name == "text_file":
    open(path, "w").write("weights: none\n")
    return ["is not a readable .npz checkpoint (it is not a zip archive); pass"]
  if name == "random_bytes":
    open(path, "wb").write(np.random.default_rng(0).bytes(4096))
    return ["is not a readable .npz checkpoint (it is not a zip archive); pass"]
  if name == "zip_not_npz":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("notes.txt", "hello")
    return ["is not a readable .npz checkpoint (a zip archive holding notes.txt"]
  raise AssertionError(name)


FILE_CASES = ["missing_key", "missing_middle_block", "extra_key", "wrong_shape",
              "integer_dtype", "text_file", "random_bytes", "zip_not_npz"]


@pytest.mark.parametrize("name", FILE_CASES)
def test_bad_files_are_one_sentence_naming_file_and_key(tmp_path, tiny_flat, name):
  path = str(tmp_path / f"{name}.npz")
  fragments = _bad_file(name, path, tiny_flat)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.load_params(path)
  message = str(e.value)
  assert message.startswith(path) and message.count(". ") == 0 and "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


def test_entry_points_refuse_a_bad_file_before_compiling(tmp_path, tiny_flat, monkeypatch):
  """predict, evaluate, export and training's two calls all see the same sentence."""
  from configs import default
  from mixer_jax import evaluate, export, predict, state  # noqa: F401  Imported unpatched.
  path = str(tmp_path / "m.npz")
  key = "MixerBlock_1/token_mixing/Dense_0/kernel"
  np.savez(path, **{k: v for k, v in tiny_flat.items() if k != key})
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the check"))
  calls = [lambda: predict.predict(path, ["img.png"]),
           lambda: evaluate.evaluate(default.get_config(), path),
           lambda: export.export(path, "timm", str(tmp_path / "out.safetensors")),
           lambda: checkpoint.load_params(path)]  # What train.py calls for init_from.
  for call in calls:
    with pytest.raises(errors.CheckpointError, match=f"m.npz is missing parameter {key}"):
      call()
  assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_other_variant_for_the_config_names_both_sizes_and_the_key():
  pretrained = random_params(_tiny(hidden_dim=10), 16)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.load_pretrained(models.param_shapes(_tiny(), 16), pretrained, source="b.npz")
  assert str(e.value).startswith(
      "b.npz is a Mixer with hidden_dim 10 but the config asks for hidden_dim 8 "
      "(MixerBlock_0/LayerNorm_0/bias has shape (10,) but the model expects (8,)); set "
      "config.model.variant")


# --- timm .safetensors: read back bit for bit, checked like .npz. -------------------

def _timm_file(tmp_path, params):
  from mixer_jax import export
  npz, out = str(tmp_path / "m.npz"), str(tmp_path / "m.safetensors")
  checkpoint.save_npz(params, npz)
  export.export(npz, "timm", out)
  return out


def test_timm_export_reads_back_bit_identical(tmp_path):
  params = random_params(_tiny(), 16, seed=7)
  path = _timm_file(tmp_path, params)
  loaded, info = checkpoint.load_params(path)
  a, b = checkpoint.flatten(params), checkpoint.flatten(loaded)
  assert sorted(a) == sorted(b)
  for k in a:
    assert b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
  assert info["model"] == TINY and info["num_classes"] == 5 and info["image_size"] == 16
  # Training's init_from: load_params, then load_pretrained into a fresh model.
  fresh = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                 models.param_shapes(_tiny(), 16))
  merged = checkpoint.load_pretrained(fresh, loaded, source=path)
  assert all(np.array_equal(v, a[k]) for k, v in checkpoint.flatten(merged).items())


def test_bad_timm_files_name_file_and_entry(tmp_path):
  from safetensors.numpy import load_file, save_file
  good = load_file(_timm_file(tmp_path, random_params(_tiny(), 16)))
  weight = "blocks.1.mlp_tokens.fc1.weight"
  cases = {
      "missing": ({k: v for k, v in good.items() if k != weight},
                  f"is missing parameter {weight} (shape (6, 16)"),
      "shape": ({**good, weight: np.ascontiguousarray(good[weight].T)},
                f"parameter {weight} has shape (16, 6) but the Mixer"),
      "dtype": ({**good, "blocks.1.norm1.bias": np.zeros(8, np.int64)},
                "parameter blocks.1.norm1.bias has dtype int64"),
      "stray": ({**good, "blocks.1.attn.qkv.weight": np.zeros(3, np.float32)},
                "entry blocks.1.attn.qkv.weight is not part of timm's MlpMixer"),
  }
  for name, (state_dict, fragment) in cases.items():
    path = str(tmp_path / f"{name}.safetensors")
    save_file(state_dict, path)
    with pytest.raises(errors.CheckpointError, match=re.escape(f"{path} ") + ".*" +
                       re.escape(fragment)):
      checkpoint.load_params(path)
  data = open(tmp_path / "m.safetensors", "rb").read()
  (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError,
                     match="cut.safetensors is not a readable .safetensors file"):
    checkpoint.load_params(str(tmp_path / "cut.safetensors"))


# --- Training checkpoints: the released layout on disk, whatever the model's. -------

@pytest.fixture(scope="module")
def setups():
  """Setups of the tiny digits model, unrolled (False) and scanned (True)."""
  from conftest import tiny_config
  from mixer_jax import state
  return {scan: state.Setup(tiny_config("/nonexistent/tfds", **{"model.scan": scan}), 10,
                            total_steps=4) for scan in (False, True)}


@pytest.fixture(scope="module")
def scanned_state(setups):
  """A scanned train state (params and Adam's moments) of random values (nothing
  compiled), placed, and its host copy in the unrolled layout."""
  from mixer_jax import state
  rng = np.random.default_rng(8)
  host = jax.tree_util.tree_map(
      lambda a: (rng.normal(size=a.shape).astype(a.dtype)
                 if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, 2, a.dtype)),
      setups[True].abstract_state)
  return state.place(host, setups[True].state_sharding), models.to_unrolled(host)


def stored_items(workdir, step=2):
  """{item: {key: shape}} of a step's params and opt_state, as orbax stored them."""
  ckpts = checkpoint.TrainCheckpoints(workdir, 3)
  try:
    found = ckpts.manager.item_metadata(step)
    return {item: {jax.tree_util.keystr(k): tuple(m.shape) for k, m in
                   jax.tree_util.tree_leaves_with_path(found[item].tree)}
            for item in ("params", "opt_state")}
  finally:
    ckpts.close()


def _restore(workdir, setup):
  ckpts = checkpoint.TrainCheckpoints(workdir, 3, setup.shardings)
  try:
    return ckpts.restore_latest(setup.abstract_state)
  finally:
    ckpts.close()


def _assert_state(restored, expected, setup):
  """Bit-identical values, the setup's shardings."""
  assert int(restored["step"]) == 2
  got = {k: restored[k] for k in ("params", "opt_state")}
  want = {k: expected[k] for k in ("params", "opt_state")}
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(got),
                             jax.tree_util.tree_leaves(want),
                             jax.tree_util.tree_leaves({k: setup.state_sharding[k]
                                                        for k in got})):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert a.sharding.is_equivalent_to(s, a.ndim), jax.tree_util.keystr(path)


def test_scanned_and_unrolled_runs_write_the_same_files_and_restore_either(
    tmp_path, setups, scanned_state):
  from mixer_jax import export, state
  scanned, unrolled = scanned_state
  work = {scan: str(tmp_path / f"scan_{scan}") for scan in (False, True)}
  states = {True: scanned, False: state.place(unrolled, setups[False].state_sharding)}
  for scan, workdir in work.items():
    ckpts = checkpoint.TrainCheckpoints(workdir, 3, setups[scan].shardings)
    ckpts.save(2, states[scan])
    ckpts.close()
  files = stored_items(work[True])
  assert files == stored_items(work[False])
  assert "['MixerBlock_1']['token_mixing']['Dense_0']['kernel']" in files["params"]
  for scan in (False, True):  # Each run's files restore into either model.
    _assert_state(_restore(work[True], setups[scan]),
                  models.to_layout(unrolled, models.model_layout(setups[scan].model)),
                  setups[scan])
  _assert_state(_restore(work[False], setups[True]), models.to_scanned(unrolled), setups[True])
  # The readers of a workdir get the released layout: load_params and export.
  checkpoint.write_model_file(work[True], dict(model=setups[True].fields, num_classes=10,
                                               image_size=8))
  out, saved, stacked = (str(tmp_path / f"{n}.npz") for n in ("out", "saved", "stacked"))
  export.export(work[True], "npz", out)
  # save_npz of scanned parameters writes the released layout; a file of stacked
  # blocks (np.savez of a scanned model) loads in it.
  checkpoint.save_npz(models.to_scanned(unrolled["params"]), saved)
  np.savez(stacked, **checkpoint.flatten(models.to_scanned(unrolled["params"])))
  for params in (checkpoint.load_params(work[True])[0], checkpoint.load_npz(out),
                 checkpoint.load_npz(saved), checkpoint.load_params(stacked)[0]):
    a, b = checkpoint.flatten(params), checkpoint.flatten(unrolled["params"])
    assert sorted(a) == sorted(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_scanned_files_of_an_earlier_version_restore_into_either_model(
    tmp_path, setups, scanned_state):
  import orbax.checkpoint as ocp
  scanned, unrolled = scanned_state
  workdir = str(tmp_path / "w")
  with ocp.CheckpointManager(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) as mngr:
    mngr.save(2, args=ocp.args.Composite(
        params=ocp.args.StandardSave(scanned["params"]),
        opt_state=ocp.args.StandardSave(scanned["opt_state"]),
        meta=ocp.args.JsonSave({"step": 2})))
  assert "['MixerBlock']['token_mixing']['Dense_0']['kernel']" in stored_items(workdir)["params"]
  _assert_state(_restore(workdir, setups[False]), unrolled, setups[False])
  _assert_state(_restore(workdir, setups[True]), models.to_scanned(unrolled), setups[True])
  checkpoint.write_model_file(workdir, dict(model=setups[True].fields, num_classes=10,
                                            image_size=8))
  params = checkpoint.flatten(checkpoint.load_params(workdir)[0])
  assert params.keys() == checkpoint.flatten(unrolled["params"]).keys()


def test_init_from_a_released_npz_into_a_scanned_model(tmp_path, setups, scanned_state):
  """train.py's init_from steps: load_params, the key check against the abstract
  parameters, the merge into the fresh ones, state_with_params; a 5-class file into
  the 10-class model re-initialises the head."""
  setup = setups[True]
  path = str(tmp_path / "m.npz")
  checkpoint.save_npz(random_params(models.from_preset("S/2", 5, **setup.fields), 8,
                                    seed=9), path)
  pretrained, _ = checkpoint.load_params(path)
  checkpoint.load_pretrained(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                    setup.abstract_state["params"]),
                             pretrained, source=path)
  fresh = models.to_scanned(scanned_state[1]["params"])  # As train.py's, on the host.
  merged = checkpoint.load_pretrained(fresh, pretrained, source=path)
  assert models.layout(merged) == models.SCANNED
  params = checkpoint.flatten(models.to_unrolled(jax.device_get(
      setup.state_with_params(merged)["params"])))
  pre = checkpoint.flatten(pretrained)
  assert sorted(params) == sorted(pre)
  for k in pre:
    want = fresh["head"][k[5:]] if k.startswith("head/") else pre[k]
    np.testing.assert_array_equal(params[k], want, err_msg=k)
