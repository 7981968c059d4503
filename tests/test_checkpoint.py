"""Released `.npz` checkpoints: layout, round trip, merging, errors."""

import os

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
  return models.create_model("S/4", num_classes, **dict(TINY, **kw))


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
  model = models.create_model("S/4", 3, **NPZ_TINY)
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
  with pytest.raises(errors.CheckpointError, match="Not a Mixer parameter tree"):
    checkpoint.load_params(str(tmp_path / "other.npz"))
