"""Intermediate features (models.capture): each block's output and its mixings', for
the three families, scanned and unrolled, with the parameter tree unchanged; and the
few-shot probe of a middle block."""

import jax
import numpy as np
import pytest

from mixer_jax import models
from test_models import _random_params

FIELDS = {
    "mixer": dict(patch_size=4, num_blocks=3, hidden_dim=8, tokens_mlp_dim=6,
                  channels_mlp_dim=12),
    "resmlp": dict(patch_size=4, num_blocks=3, hidden_dim=8, channels_mlp_dim=12),
    "gmlp": dict(patch_size=4, num_blocks=3, hidden_dim=8, channels_mlp_dim=12),
}


@pytest.mark.parametrize("family", sorted(FIELDS))
def test_blocks_captured_alike_scanned_and_unrolled(family):
  unrolled = models.create_model(family, 5, **FIELDS[family])
  scanned = models.create_model(family, 5, **FIELDS[family], scan=True,
                                remat_policy="full")
  params = _random_params(unrolled, 16, seed=1)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  logits, feats = models.capture(unrolled, params, images, mixing=True)
  # The parameter tree is the model's own: capturing adds nothing to it.
  assert jax.tree_util.tree_structure(models.param_shapes(unrolled, 16)) == \
      jax.tree_util.tree_structure(params)
  np.testing.assert_array_equal(logits, unrolled.apply({"params": params}, images))
  n, tokens, width = 3, 16, 8
  assert feats["blocks"].shape == (n, 2, tokens, width)
  assert feats["token_mixing"].shape[:2] == (n, 2)
  if family != "gmlp":
    assert feats["channel_mixing"].shape == (n, 2, tokens, width)
  # Scanned (and rematerialised) blocks stack the same features on the block axis.
  _, feats_scanned = models.capture(scanned, models.to_scanned(params), images, mixing=True)
  for kind, value in feats.items():
    np.testing.assert_allclose(feats_scanned[kind], value, rtol=2e-5, atol=2e-6,
                               err_msg=kind)


def test_last_block_is_the_tokens_before_the_head_norm():
  model = models.create_model("mixer", 5, **FIELDS["mixer"])
  params = _random_params(model, 16, seed=2)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  _, feats = models.capture(model, params, images)
  tokens = model.apply({"params": params}, images, return_tokens=True)
  last = np.asarray(feats["blocks"][-1], np.float64)
  ln = params["pre_head_layer_norm"]
  mean, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  normed = (last - mean) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
  np.testing.assert_allclose(tokens, normed, rtol=1e-4, atol=1e-5)


def test_block_features_are_the_mean_of_a_blocks_tokens():
  model = models.create_model("resmlp", 0, **FIELDS["resmlp"])
  params = _random_params(model, 16, seed=3)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  _, feats = models.capture(model, params, images)
  probe = models.block_features(model, 1)
  np.testing.assert_allclose(probe.apply({"params": params}, images),
                             np.asarray(feats["blocks"][1]).mean(axis=1), rtol=1e-6)
