"""Higher-resolution init (paper Appendix C): K^2 copies of the pre-trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import models, resolution, weights
from mixer_jax import errors

TINY = dict(patch_size=4, num_blocks=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)
NUM_CLASSES = 5


def _model(num_classes, **overrides):
  fields = dict(TINY, **overrides)
  return models.from_preset("S/4", num_classes, **fields)


def _fresh_params(model, size):
  """Stand-in for a fresh init (zeros of the right shapes; random init is slow to compile)."""
  shapes = models.param_shapes(model, size)
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def pretrained():
  """Random, non-zero parameters (heads and LayerNorms included) of an 8x8 model."""
  params = _fresh_params(_model(NUM_CLASSES), 8)
  flat = weights.flatten(params)
  rng = np.random.default_rng(0)
  for key, value in flat.items():
    noise = rng.normal(size=value.shape).astype(np.float32)
    if key.endswith("scale"):
      flat[key] = 1.0 + 0.3 * noise
    else:
      flat[key] = 0.5 * noise
  return weights.unflatten(flat)


def _apply(model, params, images):
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  return np.asarray(fn(params, jnp.asarray(images)))


def _mean_over_crops(model, params, images, k):
  """Mean of the model's outputs on the K^2 contiguous 8x8 crops of each image."""
  crops = [images[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r in range(k) for c in range(k)]
  out = _apply(model, params, np.concatenate(crops))  # One batch: (K^2 * B, ...).
  return out.reshape((k * k, images.shape[0]) + out.shape[1:]).mean(axis=0)


@pytest.mark.parametrize("k", [2, 3])
def test_hires_model_is_mean_of_crops(pretrained, k):
  size = 8 * k
  images = np.random.default_rng(k).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  overrides = resolution.hires_model_overrides(pretrained, size)
  assert overrides == {"tokens_mlp_dim": k * k * TINY["tokens_mlp_dim"]}

  # Features (pooled pre-logits) of the fine-tuning init = mean over the K^2 crops.
  feat_hi = _model(0, **overrides)
  feat_params = weights.load_pretrained(_fresh_params(feat_hi, size), pretrained,
                                           source="tiny")
  feat_lo = _model(0)
  pre_no_head = {k_: v for k_, v in pretrained.items() if k_ != "head"}
  crop_feats = _mean_over_crops(feat_lo, pre_no_head, images, k)
  np.testing.assert_allclose(_apply(feat_hi, feat_params, images), crop_feats,
                             atol=1e-5, rtol=1e-5)

  # Logits (the head is kept since the class count matches) = mean of crop logits.
  cls_hi = _model(NUM_CLASSES, **overrides)
  cls_params = weights.load_pretrained(_fresh_params(cls_hi, size), pretrained,
                                          source="tiny")
  np.testing.assert_array_equal(cls_params["head"]["kernel"], pretrained["head"]["kernel"])
  cls_lo = _model(NUM_CLASSES)
  crop_logits = _mean_over_crops(cls_lo, pretrained, images, k)
  logits = _apply(cls_hi, cls_params, images)
  np.testing.assert_allclose(logits, crop_logits, atol=1e-5, rtol=1e-5)
  assert np.abs(logits).max() > 1e-2  # Non-trivial comparison.


def test_block_diagonal_layout(pretrained):
  flat = weights.flatten(pretrained)
  init = weights.flatten(models.param_shapes(_model(NUM_CLASSES, tokens_mlp_dim=32), 16))
  out = resolution.expand_if_needed(init, flat, source="tiny")
  p = "MixerBlock_1/token_mixing"
  k0, b0 = flat[f"{p}/Dense_0/kernel"], flat[f"{p}/Dense_0/bias"]
  k1, b1 = flat[f"{p}/Dense_1/kernel"], flat[f"{p}/Dense_1/bias"]
  n0, n1 = out[f"{p}/Dense_0/kernel"], out[f"{p}/Dense_1/kernel"]
  assert n0.shape == (16, 32) and n1.shape == (32, 16)
  # Old grid 2x2, new 4x4. Token t = R*4 + C; window (R//2)*2 + C//2; local (R%2)*2 + C%2.
  for t in range(16):
    r, c = divmod(t, 4)
    win, loc = (r // 2) * 2 + c // 2, (r % 2) * 2 + c % 2
    for w in range(4):
      blk = slice(8 * w, 8 * (w + 1))
      if w == win:
        np.testing.assert_array_equal(n0[t, blk], k0[loc])
        np.testing.assert_array_equal(n1[blk, t], k1[:, loc])
      else:
        assert not n0[t, blk].any() and not n1[blk, t].any()
    assert out[f"{p}/Dense_1/bias"][t] == b1[loc]
  np.testing.assert_array_equal(out[f"{p}/Dense_0/bias"], np.tile(b0, 4))
  # Everything else untouched; same token count -> the very same dict.
  assert out["MixerBlock_1/channel_mixing/Dense_0/kernel"] is flat[
      "MixerBlock_1/channel_mixing/Dense_0/kernel"]
  same = weights.flatten(models.param_shapes(_model(NUM_CLASSES), 8))
  assert resolution.expand_if_needed(same, flat, source="tiny") is flat


def test_non_multiple_size_is_one_sentence_error(pretrained):
  model = _model(NUM_CLASSES, tokens_mlp_dim=32)
  init = models.param_shapes(model, 12)  # 3x3 tokens: 9 is not K^2 * 4.
  with pytest.raises(errors.CheckpointError) as e:
    weights.load_pretrained(init, pretrained, source="tiny.npz")
  msg = str(e.value)
  assert "8, 16, 24 px" in msg and "12 px" in msg and msg.count(". ") == 0, msg
  with pytest.raises(errors.CheckpointError, match="8, 16, 24 px"):
    resolution.hires_model_overrides(pretrained, 12)
  with pytest.raises(errors.CheckpointError, match="multiple of the patch size"):
    resolution.hires_model_overrides(pretrained, 10)


def test_wrong_tokens_mlp_dim(pretrained):
  init = models.param_shapes(_model(NUM_CLASSES), 16)  # Built with the original D_S.
  with pytest.raises(errors.CheckpointError, match="tokens_mlp_dim=32"):
    weights.load_pretrained(init, pretrained, source="tiny.npz")


def test_overrides_from_describe_and_info(pretrained):
  info = weights.describe(pretrained)
  assert resolution.hires_model_overrides(info, 8) == {"tokens_mlp_dim": 8}
  assert resolution.hires_model_overrides(info, 32) == {"tokens_mlp_dim": 128}
  load_info = {"image_size": 8, "model": dict(TINY)}
  assert resolution.hires_model_overrides(load_info, 24) == {"tokens_mlp_dim": 72}


def test_paper_sizes_message():
  # B/16 at 224 px -> 14x14 tokens; 304 px (19x19) is not allowed.
  with pytest.raises(errors.CheckpointError, match="224, 448, 672 px"):
    resolution.resolution_factor(196, 361, source="Mixer-B_16.npz", patch_size=16)
  assert resolution.resolution_factor(196, 784, patch_size=16) == 2


@pytest.mark.parametrize("variant", ["resmlp_12", "gmlp_s16"])
def test_resmlp_and_gmlp_start_as_copies_of_the_crops(variant):
  """Their S x S token maps expand block-diagonally (resolution.py); no size changes."""
  fields = dict(patch_size=4, num_blocks=2, hidden_dim=8, channels_mlp_dim=12)
  lo, hi = (models.from_preset(variant, NUM_CLASSES, **fields) for _ in range(2))
  rng = np.random.default_rng(1)
  pre = jax.tree_util.tree_map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32),
                               models.param_shapes(lo, 8))
  assert resolution.hires_model_overrides(pre, 16) == {}
  params = weights.load_pretrained(_fresh_params(hi, 16), pre, source="tiny")
  maps = [k for k in weights.flatten(params) if k.endswith("proj/kernel")
          or k.endswith("token_mixing/kernel")]
  assert len(maps) == 2 and all(weights.flatten(params)[k].shape == (16, 16) for k in maps)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  logits = _apply(hi, params, images)
  np.testing.assert_allclose(logits, _mean_over_crops(lo, pre, images, 2), atol=1e-5,
                             rtol=1e-5)
  assert np.abs(logits).max() > 1e-2
  with pytest.raises(errors.CheckpointError, match="integer multiples K of its side"):
    weights.load_pretrained(_fresh_params(hi, 12), pre, source="tiny")
