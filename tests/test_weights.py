"""weights.py: released `.npz` and timm `.safetensors` files, their round trips and
checks (one sentence per bad file), and the merge into a fresh model."""

import os
import re
import zipfile

import jax
import numpy as np
import pytest

from mixer_jax import errors
from mixer_jax import models
from mixer_jax import weights
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
  loaded = weights.load_npz(str(tmp_path / "Mixer-T_4.npz"))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  logits = model.apply({"params": loaded}, images)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(logits, np_mixer_forward(images.astype(np.float64), p64, 4),
                             rtol=1e-4, atol=1e-4)


def test_npz_round_trip_is_lossless(tmp_path):
  params = random_params(_tiny(), 16, seed=4)
  path = str(tmp_path / "out.npz")
  weights.save_npz(params, path)
  with np.load(path) as data:  # Same flat layout as the released files.
    assert sorted(data.files) == sorted(weights.flatten(params))
  again = weights.load_npz(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_describe_infers_the_architecture():
  info = weights.describe(random_params(_tiny(), 16))
  assert info == dict(patch_size=4, hidden_dim=8, num_blocks=2, num_tokens=16,
                      tokens_mlp_dim=6, channels_mlp_dim=12, num_classes=5)


def test_load_params_of_npz_reports_model_info(tmp_path):
  path = str(tmp_path / "m.npz")
  weights.save_npz(random_params(_tiny(), 16), path)
  _, info = weights.load_params(path)
  assert info["model"] == TINY and info["num_classes"] == 5 and info["image_size"] == 16


def test_head_is_reinitialised_for_a_new_class_count():
  pretrained = random_params(_tiny(num_classes=5), 16, seed=5)
  fresh = models.init_params(_tiny(num_classes=3), 16)
  merged = weights.load_pretrained(fresh, pretrained)
  np.testing.assert_array_equal(merged["head"]["kernel"], np.zeros((8, 3)))
  np.testing.assert_array_equal(merged["stem"]["kernel"], pretrained["stem"]["kernel"])
  # Same class count: the pretrained head is kept.
  same = weights.load_pretrained(models.init_params(_tiny(num_classes=5), 16), pretrained)
  np.testing.assert_array_equal(same["head"]["kernel"], pretrained["head"]["kernel"])


def test_load_pretrained_of_a_released_npz_zeroes_the_new_head(tmp_path):
  """A 10-class released-layout `.npz` (non-zero head bias) into a 3-class model."""
  npz = weights.load_npz(write_checkpoint(str(tmp_path / "c10.npz"), 10,
                                             bias=np.arange(10, dtype=np.float32)))
  model = models.from_preset("S/4", 3, **NPZ_TINY)
  fresh = models.init_params(model, NPZ_SIZE, jax.random.key(1))
  merged = weights.flatten(weights.load_pretrained(fresh, npz, source="c10.npz"))
  pre = weights.flatten(npz)
  assert merged["head/kernel"].shape == (NPZ_TINY["hidden_dim"], 3)
  assert not np.any(merged["head/kernel"]) and not np.any(merged["head/bias"])
  assert set(merged) == set(pre)
  for k in merged:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(merged[k], pre[k])


def test_features_model_drops_the_checkpoint_head():
  pretrained = random_params(_tiny(num_classes=5), 16)
  fresh = models.init_params(_tiny(num_classes=0), 16)
  merged = weights.load_pretrained(fresh, pretrained)
  assert "head" not in merged


def test_missing_key_is_named():
  pretrained = random_params(_tiny(), 16)
  del pretrained["MixerBlock_1"]["LayerNorm_1"]
  with pytest.raises(errors.CheckpointError, match="MixerBlock_1/LayerNorm_1/bias"):
    weights.load_pretrained(models.init_params(_tiny(), 16), pretrained)


def test_wrong_shape_names_key_and_both_shapes():
  pretrained = random_params(_tiny(hidden_dim=10), 16)
  with pytest.raises(errors.CheckpointError,
                     match=r"MixerBlock_0/LayerNorm_0/bias has shape \(10,\) but the model "
                           r"expects \(8,\)"):
    weights.load_pretrained(models.init_params(_tiny(), 16), pretrained)


def test_unexpected_key_is_named():
  pretrained = random_params(_tiny(num_blocks=3), 16)
  with pytest.raises(errors.CheckpointError, match="MixerBlock_2"):
    weights.load_pretrained(models.init_params(_tiny(), 16), pretrained)


def test_truncated_npz_and_non_checkpoint_files(tmp_path):
  path = tmp_path / "good.npz"
  weights.save_npz(random_params(_tiny(), 16), str(path))
  data = path.read_bytes()
  (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError, match="truncated.npz is not a readable"):
    weights.load_npz(str(tmp_path / "truncated.npz"))
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(errors.CheckpointError, match="notes.txt is not a readable"):
    weights.load_npz(str(tmp_path / "notes.txt"))
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    weights.load_npz(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(errors.CheckpointError,
                     match="other.npz is not a Mixer checkpoint .it has no parameter stem/kernel"):
    weights.load_params(str(tmp_path / "other.npz"))


# --- Files in: every problem is one sentence naming the file and the first key. ------

@pytest.fixture(scope="module")
def tiny_flat():
  return weights.flatten(random_params(_tiny(), 16, seed=6))


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
    weights.load_params(path)
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
           lambda: weights.load_params(path)]  # What train.py calls for init_from.
  for call in calls:
    with pytest.raises(errors.CheckpointError, match=f"m.npz is missing parameter {key}"):
      call()
  assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_other_variant_for_the_config_names_both_sizes_and_the_key():
  pretrained = random_params(_tiny(hidden_dim=10), 16)
  with pytest.raises(errors.CheckpointError) as e:
    weights.load_pretrained(models.param_shapes(_tiny(), 16), pretrained, source="b.npz")
  assert str(e.value).startswith(
      "b.npz is a Mixer with hidden_dim 10 but the config asks for hidden_dim 8 "
      "(MixerBlock_0/LayerNorm_0/bias has shape (10,) but the model expects (8,)); set "
      "config.model.variant")


# --- timm .safetensors: read back bit for bit, checked like .npz. -------------------

def _timm_file(tmp_path, params):
  from mixer_jax import export
  npz, out = str(tmp_path / "m.npz"), str(tmp_path / "m.safetensors")
  weights.save_npz(params, npz)
  export.export(npz, "timm", out)
  return out


def test_timm_export_reads_back_bit_identical(tmp_path):
  params = random_params(_tiny(), 16, seed=7)
  path = _timm_file(tmp_path, params)
  loaded, info = weights.load_params(path)
  a, b = weights.flatten(params), weights.flatten(loaded)
  assert sorted(a) == sorted(b)
  for k in a:
    assert b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
  assert info["model"] == TINY and info["num_classes"] == 5 and info["image_size"] == 16
  # Training's init_from: load_params, then load_pretrained into a fresh model.
  fresh = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                 models.param_shapes(_tiny(), 16))
  merged = weights.load_pretrained(fresh, loaded, source=path)
  assert all(np.array_equal(v, a[k]) for k, v in weights.flatten(merged).items())


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
      weights.load_params(path)
  data = open(tmp_path / "m.safetensors", "rb").read()
  (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError,
                     match="cut.safetensors is not a readable .safetensors file"):
    weights.load_params(str(tmp_path / "cut.safetensors"))


# --------------------------------------- layouts Google's loaders also accept
def _logits(model, params, seed=0):
  images = np.random.default_rng(seed).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  return np.asarray(model.apply({"params": params}, images))


def test_bfloat16_and_float16_npz_load_as_float32(tmp_path):
  """big_vision writes bfloat16 arrays with np.savez, which NumPy stores as |V2."""
  import ml_dtypes
  model = _tiny(num_classes=7)
  params = random_params(model, 16, seed=5)
  reference = _logits(model, params)
  for dtype in (ml_dtypes.bfloat16, np.float16):
    low = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype), params)
    path = str(tmp_path / f"{np.dtype(dtype).name}.npz")
    _write_released_layout(path, low)
    if dtype is ml_dtypes.bfloat16:
      with np.load(path) as data:
        assert data["stem/kernel"].dtype == np.dtype("V2")  # As NumPy stores it.
    loaded, info = weights.load_params(path)
    flat = weights.flatten(loaded)
    assert all(v.dtype == np.float32 for v in flat.values())
    # Exactly the rounded values, widened.
    np.testing.assert_array_equal(
        flat["stem/kernel"], np.asarray(params["stem"]["kernel"]).astype(dtype).astype(np.float32))
    rounded = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype).astype(np.float32),
                                     params)
    np.testing.assert_array_equal(_logits(model, loaded), _logits(model, rounded))
    tol = 0.05 if dtype is ml_dtypes.bfloat16 else 5e-3  # 8 and 11 mantissa bits.
    np.testing.assert_allclose(_logits(model, loaded), reference, rtol=tol, atol=tol)
    assert info["model"] == {k: v for k, v in TINY.items()}


def _big_vision_second_layout(params):
  """The pre-linen layout big_vision's mlp_mixer.load also reads: `embedding`,
  `Mixer/encoderblock_<i>/{LayerNorm_0, LayerNorm_2 (pre-linen numbering),
  token_mixing_phase_0/{kernel1, bias1, kernel2, bias2}, ...}`, `Mixer/encoder_norm`,
  with the MLP kernels carrying a singleton axis as its squeeze() allows."""
  out = {"embedding": params["stem"], "head": params["head"],
         "Mixer": {"encoder_norm": params["pre_head_layer_norm"]}}
  for key, block in params.items():
    if not key.startswith("MixerBlock_"):
      continue

    def phase(mlp):
      return {"kernel1": np.asarray(mlp["Dense_0"]["kernel"])[None],
              "bias1": mlp["Dense_0"]["bias"], "kernel2": mlp["Dense_1"]["kernel"],
              "bias2": np.asarray(mlp["Dense_1"]["bias"])[None]}

    out["Mixer"][f"encoderblock_{key[len('MixerBlock_'):]}"] = {
        "LayerNorm_0": block["LayerNorm_0"], "LayerNorm_2": block["LayerNorm_1"],
        "token_mixing_phase_0": phase(block["token_mixing"]),
        "channel_mixing_phase_0": phase(block["channel_mixing"])}
  return out


def test_big_vision_second_layout_loads_key_by_key(tmp_path):
  model = _tiny(num_classes=7)
  params = random_params(model, 16, seed=6)
  path = str(tmp_path / "bv.npz")
  flat = _write_released_layout(path, _big_vision_second_layout(params))
  assert "Mixer/encoderblock_1/token_mixing_phase_0/kernel1" in flat and "embedding/kernel" in flat
  loaded, info = weights.load_params(path)
  assert sorted(weights.flatten(loaded)) == sorted(weights.flatten(params))
  np.testing.assert_array_equal(_logits(model, loaded), _logits(model, params))
  assert info["model"] == {k: v for k, v in TINY.items()}
  # Converted, then checked like any file: a stray block entry is named.
  bad = _big_vision_second_layout(params)
  bad["Mixer"]["encoderblock_0"]["extra"] = {"kernel": np.zeros(3, np.float32)}
  _write_released_layout(path, bad)
  with pytest.raises(errors.CheckpointError, match=r"MixerBlock_0/extra/kernel"):
    weights.load_params(path)
