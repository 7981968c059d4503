"""The model registry and the Mixer: exact parameter counts, layout, numerics, errors."""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ml_collections
from absl import flags
from ml_collections import config_flags

from mixer_jax import errors, models, sharding, state
from mixer_jax import kernels as kernel_sets
from mixer_jax.kernels import cpu
from mixer_jax.models import gmlp, layers, mixer
from conftest import model_of, set_overrides, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# REFERENCE.md: 224x224, 1000 classes.
PAPER_COUNTS = {
    "S/32": 19_104_624, "S/16": 18_528_264, "B/32": 60_293_428, "B/16": 59_880_472,
    "L/32": 206_939_264, "L/16": 208_196_168, "H/14": 432_350_952,
}
TINY = dict(patch_size=4, num_blocks=2, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=12)
KERNELS = ["xla", "cpu"]


@pytest.mark.parametrize("variant,expected", sorted(PAPER_COUNTS.items()))
def test_paper_parameter_counts(variant, expected):
  model = model_of(variant, 1000)
  assert models.count_params(models.param_shapes(model, 224)) == expected


def test_headless_counts_match_reference():
  for variant, headless in (("S/32", 18_591_624), ("H/14", 431_069_952)):
    model = model_of(variant, 0)
    assert models.count_params(models.param_shapes(model, 224)) == headless


@pytest.mark.parametrize("kernels", KERNELS)
def test_module_tree_matches_released_layout(kernels):
  shapes = models.param_shapes(model_of("B/16", 1000, kernels=kernels), 224)
  assert set(shapes) == {"stem", "pre_head_layer_norm", "head"} | {
      f"MixerBlock_{i}" for i in range(12)}
  block = jax.tree_util.tree_map(lambda s: s.shape, shapes["MixerBlock_3"])
  assert block == {
      "LayerNorm_0": {"scale": (768,), "bias": (768,)},
      "token_mixing": {"Dense_0": {"kernel": (196, 384), "bias": (384,)},
                       "Dense_1": {"kernel": (384, 196), "bias": (196,)}},
      "LayerNorm_1": {"scale": (768,), "bias": (768,)},
      "channel_mixing": {"Dense_0": {"kernel": (768, 3072), "bias": (3072,)},
                         "Dense_1": {"kernel": (3072, 768), "bias": (768,)}}}
  assert shapes["stem"]["kernel"].shape == (16, 16, 3, 768)
  assert shapes["head"]["kernel"].shape == (768, 1000)


def _tiny(num_classes=5, **kw):
  return model_of("S/4", num_classes, **dict(TINY, **kw))


def test_forward_shapes_features_and_tokens():
  images = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
  model = _tiny()
  params = models.init_params(model, 16)
  logits, tokens = jax.jit(lambda p: (model.apply({"params": p}, images, train=False),
                                      model.apply({"params": p}, images, return_tokens=True)))(params)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)  # Zero-initialised head.
  features = _tiny(num_classes=0)
  feats = jax.jit(features.apply)({"params": {k: v for k, v in params.items() if k != "head"}},
                                  images)
  assert feats.shape == (2, 8)
  assert tokens.shape == (2, 16, 8)
  np.testing.assert_allclose(tokens.mean(axis=1), feats, rtol=1e-6, atol=1e-6)
  assert model_of("S/4", None, **TINY).num_classes is None


# ------------------------------------------------------------------ the registry
def test_models_have_only_the_papers_fields_and_kernels_enter_by_interceptors():
  for family in models.families():
    fields = {f.name: f for f in dataclasses.fields(family.module)
              if f.name not in ("parent", "name")}
    assert len(fields) <= 14, (family.name, sorted(fields))  # The Mixer: 12.
    assert not [n for n, f in fields.items() if isinstance(f.default, type(lambda: 0))]
  assert len([f for f in dataclasses.fields(mixer.MlpMixer)
              if f.name not in ("parent", "name")]) == 12
  assert kernel_sets.interceptors("xla") == ()
  assert kernel_sets.interceptors("cpu") == (cpu.intercept,)
  # This suite runs on the CPU backend: "auto" is the cpu forms; "pallas" only by name.
  assert jax.default_backend() == "cpu" and kernel_sets.interceptors("auto") == (cpu.intercept,)
  assert kernel_sets.interceptors("pallas") != kernel_sets.interceptors("auto")
  plain = models.from_preset("S/32", 10)
  assert type(plain) is mixer.MlpMixer  # create_model gives the plain model.
  fast = model_of("S/32", 10, kernels="cpu")
  assert fast.model == plain and fast.hidden_dim == 512 and fast.clone(scan=True).scan


def test_a_family_registers_with_one_line(monkeypatch):
  class TinyBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train=False, drop_rate=None):
      return nn.Dense(x.shape[-1])(x)

  class Tiny(nn.Module):
    num_classes: int
    width: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train=False):
      return nn.Dense(self.num_classes)(x.reshape(len(x), -1))

  monkeypatch.setattr(models, "_FAMILIES", list(models._FAMILIES))
  models.register(models.Family(
      "tiny", Tiny, TinyBlock, "Tiny",
      lambda name: {"width": int(name[5:])} if name.startswith("tiny_") else None,
      names=("tiny_3",)))
  model = model_of("tiny_3", 4, dropout=0.1)
  assert (model.width, model.dropout) == (3, 0.1)
  assert models.count_params(models.param_shapes(model, 4)) == 48 * 4 + 4
  assert models.model_name("tiny", {"width": 3}) == "tiny_3"
  assert models.from_preset("B/16", 4).hidden_dim == 768  # The Mixer is still there.


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/0", "b/16", "B/-2", ""])
def test_unknown_variant_raises(variant):
  with pytest.raises(ValueError, match="variant"):
    models.preset(variant)


def _resolved(**overrides):
  """The tiny config with `overrides`, resolved; without ml_collections' type checks, so
  resolve_model's own are what is tested (the benchmark's configs have none)."""
  config = ml_collections.ConfigDict(tiny_config("/nonexistent").to_dict(), type_safe=False)
  state.resolve_model(set_overrides(config, overrides))
  return config


@pytest.mark.parametrize("field,value", [("hidden_dim", 0), ("num_blocks", -1),
                                         ("patch_size", 0), ("tokens_mlp_dim", 2.5)])
def test_non_positive_size_raises(field, value):
  with pytest.raises(errors.ConfigError, match=f"^config.model.{field}={value!r} must be a "
                     r"positive integer \(or unset for the preset's value\).$"):
    _resolved(**{f"model.{field}": value})


def test_other_bad_model_values_raise_once_in_resolve_model():
  for overrides, sentence in (
      ({"model.stoch_depth": 1.5}, "config.model.stoch_depth=1.5 must be in [0, 1)."),
      ({"model.dropout": -0.1}, "config.model.dropout=-0.1 must be in [0, 1)."),
      ({"dtype": "float8"}, "config.dtype='float8' is not one of float32, bfloat16, float16."),
      ({"model.kernels": "gpu"},
       "config.model.kernels='gpu' is not one of auto, xla, cpu, pallas."),
      ({"model.remat_policy": "dots"}, "config.model.remat_policy='dots' is not one of none, "
       "full, dots_saveable, dots_with_no_batch_dims_saveable."),
      ({"model.scan": "yes"}, "config.model.scan='yes' must be True or False."),
      ({"model.variant": "gmlp_s16", "model.tokens_mlp_dim": None,
        "model.channels_mlp_dim": 13},
       "gMLP's channels_mlp_dim=13 must be even: the spatial gating unit splits it in two "
       "halves."),
      ({"model.layerscale_init": 0.1}, "config.model.layerscale_init=0.1 is not a field of "
       "S/2 (a mixer model: patch_size, num_blocks, hidden_dim, tokens_mlp_dim, "
       "channels_mlp_dim, stoch_depth, dropout, remat_policy, scan); leave it unset.")):
    with pytest.raises(errors.ConfigError, match=f"^{re.escape(sentence)}$"):
      _resolved(**overrides)


def test_resolve_model_fills_the_family_every_field_and_the_name():
  config = _resolved()  # configs/default.py: "S/2" with its own sizes.
  assert config.model.family == "mixer" and config.model.name == "Mixer custom (patch 2, 2 x 16)"
  config = tiny_config("/nonexistent", **{"model.variant": "B/8", "model.num_blocks": None,
                                          "model.patch_size": None,
                                          "model.hidden_dim": None,
                                          "model.tokens_mlp_dim": None,
                                          "model.channels_mlp_dim": None})
  state.resolve_model(config)
  assert (config.model.name, config.model.hidden_dim, config.model.patch_size) == ("B/8", 768, 8)
  config = tiny_config("/nonexistent", **{"model.variant": "resmlp_24", "model.tokens_mlp_dim": None,
                                          "model.num_blocks": 24, "model.hidden_dim": 384,
                                          "model.channels_mlp_dim": 1536,
                                          "model.patch_size": 16})
  state.resolve_model(config)
  assert (config.model.name, config.model.layerscale_init) == ("resmlp_24", 1e-5)
  # Resolving again changes nothing.
  before = config.to_dict()
  state.resolve_model(config)
  assert config.to_dict() == before


def test_a_new_token_mixing_hyperparameter_is_one_field_and_one_config_line(monkeypatch):
  """README "Changing the model": the field on the MLP, its block and the model, one
  config line, set from the command line, reaches the token-mixing MLP through the
  trainer's setup, unrolled and scanned."""
  seen = []

  class MlpBlock(layers.MlpBlock):
    token_scale: float = 1.0  # The new hyperparameter...

    @nn.compact
    def __call__(self, x, *, train=False):
      seen.append((self.name, self.token_scale))
      y = super().__call__(x, train=train)
      return y * self.token_scale if self.name == "token_mixing" else y

  class MixerBlock(mixer.MixerBlock):
    token_scale: float = 1.0  # ...handed on by the block...

  class MlpMixer(mixer.MlpMixer):
    token_scale: float = 1.0  # ...from the model, whose fields config.model sets.

  # As if edited in layers.py and mixer.py: the modules look each other up by name.
  monkeypatch.setattr(mixer, "MlpBlock", MlpBlock)
  monkeypatch.setattr(mixer, "MixerBlock", MixerBlock)
  monkeypatch.setattr(models, "_FAMILIES", [
      dataclasses.replace(f, module=MlpMixer) if f.name == "mixer" else f
      for f in models._FAMILIES])
  base = tiny_config("/nonexistent")
  base.model.token_scale = 1.0  # The config line (configs/common.py).
  argv = ["prog", "--config.model.token_scale=0.5"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from there.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", base, flag_values=flag_values)
  flag_values(argv)
  config = flag_values.config
  state.resolve_model(config)
  setup = state.Setup(config, 5, mesh=sharding.make_mesh(1, jax.devices()[:1]))
  assert setup.model.token_scale == 0.5
  images = jnp.ones((2, 8, 8, 3))
  params = setup.model.init(jax.random.key(0), images)["params"]
  tokens = lambda model: model.apply({"params": params}, images, return_tokens=True)
  scaled = tokens(setup.eval_model)
  assert ("token_mixing", 0.5) in seen and ("channel_mixing", 0.5) in seen
  assert not np.allclose(scaled, tokens(setup.eval_model.clone(token_scale=1.0)))
  seen.clear()
  scanned = setup.eval_model.clone(scan=True, remat_policy="full")
  np.testing.assert_allclose(
      scanned.apply({"params": models.to_scanned(params)}, images, return_tokens=True),
      scaled, rtol=1e-6, atol=1e-6)
  assert set(seen) == {("token_mixing", 0.5), ("channel_mixing", 0.5)}


def test_image_side_not_divisible_by_patch_raises():
  model = model_of("B/16", 10)
  with pytest.raises(ValueError, match="Image side 200 is not divisible by the patch size 16"):
    models.param_shapes(model, 200)


# ------------------------------------------------------- training-time options
def _random_params(model, image_size, seed=0, scale=0.5):
  shapes = models.param_shapes(model, image_size)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [rng.normal(0, scale, s.shape).astype(np.float32) for s in leaves])


def test_stochastic_depth_eval_is_deterministic_and_train_drops():
  model = _tiny(stoch_depth=0.5, num_blocks=4)
  params = _random_params(model, 16, scale=0.3)
  images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1)
  apply = jax.jit(lambda seed, train: model.apply(
      {"params": params}, images, train=train, rngs={"dropout": jax.random.key(seed)}),
                  static_argnums=1)
  np.testing.assert_array_equal(apply(0, False), apply(1, False))
  np.testing.assert_array_equal(apply(3, True), apply(3, True))
  assert not np.allclose(apply(0, True), apply(1, True))


def test_drop_path_survival_rate_and_rescaling():
  x = jnp.ones((20_000, 3, 2))
  rate = 0.3
  y = layers.drop_path(x, rate, jax.random.key(0))
  per_example = np.asarray(y[:, 0, 0])
  kept = per_example != 0
  # All of an example's branch is kept or dropped together (per-example decision).
  np.testing.assert_array_equal(np.asarray(y != 0).all(axis=(1, 2)), kept)
  assert abs(kept.mean() - (1 - rate)) < 0.015
  np.testing.assert_allclose(per_example[kept], 1 / (1 - rate), rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 0.03  # Expected value preserved.


@pytest.mark.parametrize("branch", ["token_mixing", "channel_mixing"])
def test_mixer_block_drops_each_residual_branch_at_its_rate(branch):
  """Silence the other branch; then block(x) - x is 0 or branch(x) / (1 - rate)."""
  rate, n = 0.5, 1000
  block = mixer.MixerBlock(tokens_mlp_dim=8, channels_mlp_dim=16)
  x = jax.random.normal(jax.random.key(0), (n, 4, 8))
  params = block.init(jax.random.key(1), x[:1])["params"]
  other = "channel_mixing" if branch == "token_mixing" else "token_mixing"
  params[other]["Dense_1"] = jax.tree_util.tree_map(jnp.zeros_like, params[other]["Dense_1"])
  # The rate as a traced array, as a scanned model passes it.
  both = jax.jit(lambda key, rate: (
      block.apply({"params": params}, x, False, rate) - x,
      block.apply({"params": params}, x, True, rate, rngs={"dropout": key}) - x))
  full, got = map(np.asarray, both(jax.random.key(2), jnp.float32(rate)))
  assert np.abs(full).max(axis=(1, 2)).min() > 1e-3  # The branch is never 0 itself.
  dropped = np.all(np.abs(got) < 1e-6, axis=(1, 2))
  assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(got[~dropped], full[~dropped] / (1 - rate), rtol=1e-4, atol=1e-5)


def _record_blocks(model, images, rngs):
  """Per MixerBlock call, in block order: (stochastic-depth rate, the block's first
  dropout key), read at run time, so under nn.scan too."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, mixer.MixerBlock) and context.method_name == "__call__":
      rate = args[2] if len(args) > 2 else kwargs.get("drop_rate")
      key = jax.random.key_data(context.module.make_rng("dropout"))
      jax.debug.callback(lambda r, k: seen.append((float(r), tuple(np.ravel(k)))),
                         -1.0 if rate is None else rate, key, ordered=True)
    return next_fun(*args, **kwargs)

  def forward(p):
    with nn.intercept_methods(record):
      return model.apply({"params": p}, images, train=True, rngs=rngs)

  params = models.param_shapes(model, images.shape[1])
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  jax.block_until_ready(jax.jit(forward)(params))
  return seen


def test_stochastic_depth_rates_rise_linearly_over_blocks_unrolled_or_scanned():
  images = jnp.zeros((2, 8, 8, 3))
  rngs = {"dropout": jax.random.key(0)}
  rates = [0.0, 0.1, 0.2, 0.3]
  np.testing.assert_allclose(mixer.blocks.stoch_depth_rates(0.3, 4), rates, atol=1e-7)
  model = _tiny(stoch_depth=0.3, num_blocks=4)
  # Unrolled: each block gets its rate as a number (seen here at trace time, no compile).
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, mixer.MixerBlock) and context.method_name == "__call__":
      seen[context.module.name] = float(args[2])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=True))
  np.testing.assert_allclose([seen[f"MixerBlock_{i}"] for i in range(4)], rates, atol=1e-7)
  # Scanned: the same float32 rates arrive one per iteration, each block with its own
  # dropout key (split_rngs).
  scanned = _record_blocks(model.clone(scan=True), images, rngs)
  np.testing.assert_array_equal([r for r, _ in scanned],
                                mixer.blocks.stoch_depth_rates(0.3, 4))
  assert len({k for _, k in scanned}) == 4
  # Train mode without stochastic depth passes no rate (no drop, no rng needed).
  assert mixer.blocks.stoch_depth_rates(0.0, 1).tolist() == [0.0]


@pytest.mark.parametrize("kernels", KERNELS)
def test_bfloat16_compute_keeps_float32_params(kernels):
  model = _tiny(dtype="bfloat16", kernels=kernels)
  params = models.param_shapes(model, 16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  images = jnp.zeros((2, 16, 16, 3))
  logits, state = jax.eval_shape(lambda p: model.apply(  # Dtypes from tracing alone.
      {"params": p}, images, capture_intermediates=True, mutable=["intermediates"]), params)
  assert logits.dtype == jnp.float32
  block = state["intermediates"]["MixerBlock_0"]
  for layer in (state["intermediates"]["stem"], block["channel_mixing"]["Dense_0"],
                block["token_mixing"]["Dense_1"], block["LayerNorm_0"]):
    assert layer["__call__"][0].dtype == jnp.bfloat16
  # Stochastic depth's float32 rates leave the residual stream in bfloat16, unrolled
  # or scanned (where a float32 carry would not trace).
  for scan in (False, True):
    model = _tiny(dtype="bfloat16", kernels=kernels, stoch_depth=0.2, scan=scan)
    tokens = jax.eval_shape(lambda p: model.apply(
        {"params": p}, images, train=True, return_tokens=True,
        rngs={"dropout": jax.random.key(0)}), models.param_shapes(model, 16))
    assert tokens.dtype == jnp.float32  # Cast at the end, as the logits.
    stream = jax.eval_shape(lambda p: model.apply(
        {"params": p}, images, train=True, capture_intermediates=True,
        mutable=["intermediates"], rngs={"dropout": jax.random.key(0)}),
        models.param_shapes(model, 16))[1]["intermediates"]
    if not scan:
      assert stream["MixerBlock_1"]["__call__"][0].dtype == jnp.bfloat16


def test_scan_and_remat_policies_give_the_plain_loss_and_gradients():
  # kernels="cpu" (the default here): its matmul's custom VJP under remat and scan.
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  plain = _tiny(kernels="cpu")
  params = _random_params(plain, 16, scale=0.3)
  variants = [plain, _tiny(kernels="cpu", scan=True, remat_policy="dots_saveable"),
              _tiny(kernels="cpu", remat_policy="full")]

  def all_losses(params):
    out = []
    for model in variants:
      loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, images, train=True)))
      value, grads = jax.value_and_grad(loss)(models.to_layout(params, models.model_layout(model)))
      out.append((value, models.to_unrolled(grads)))
    return out

  (a, grads_a), *others = jax.jit(all_losses)(params)
  for b, grads_b in others:
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert jax.tree_util.tree_structure(grads_a) == jax.tree_util.tree_structure(grads_b)
    for u, v in zip(jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_b)):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- scanned blocks: the two layouts
def test_scanned_model_equals_unrolled_on_the_same_weights():
  unrolled, scanned = _tiny(num_blocks=3, kernels="xla"), _tiny(num_blocks=3, kernels="xla",
                                                               scan=True)
  shapes = models.param_shapes(scanned, 16)
  assert set(shapes) == {"stem", "MixerBlock", "pre_head_layer_norm", "head"}
  assert shapes["MixerBlock"]["token_mixing"]["Dense_0"]["kernel"].shape == (3, 16, 6)
  assert models.count_params(shapes) == models.count_params(models.param_shapes(unrolled, 16))
  assert jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes) == jax.tree_util.tree_map(
      lambda s: (s.shape, s.dtype), models.to_scanned(models.param_shapes(unrolled, 16)))
  params = _random_params(unrolled, 16)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  a, b = jax.jit(lambda p, q: (unrolled.apply({"params": p}, images),
                               scanned.apply({"params": q}, images)))(
      params, models.to_scanned(params))
  np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
  assert np.abs(np.asarray(a)).max() > 0.1


def test_layout_conversion_round_trips_exactly_params_and_optimizer_state():
  import optax
  params = _random_params(_tiny(num_blocks=3), 16)
  scanned = models.to_scanned(params)
  assert (models.layout(params), models.layout(scanned)) == ("unrolled", "scanned")
  for i in range(3):  # Block i is entry i of every stacked array, key by key.
    for path, leaf in jax.tree_util.tree_leaves_with_path(params[f"MixerBlock_{i}"]):
      stacked = scanned["MixerBlock"]
      for k in path:
        stacked = stacked[k.key]
      np.testing.assert_array_equal(stacked[i], leaf)
  back = models.to_unrolled(scanned)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(u, v)
  # Conversions are idempotent; to_layout picks the direction.
  assert models.to_layout(scanned, "scanned")["MixerBlock"] is not None
  assert set(models.to_layout(scanned, "unrolled")) == set(params)
  # A whole train state: Adam's count stays, mu and nu convert with the parameters.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = {"step": np.int32(3), "params": params, "opt_state": tx.init(params)}
  state = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, state)
  state_scanned = models.to_scanned(state)
  assert models.layout(state_scanned) == "scanned"
  mu = state_scanned["opt_state"][1][0].mu
  assert mu["MixerBlock"]["channel_mixing"]["Dense_1"]["kernel"].shape == (3, 12, 8)
  round_trip = models.to_unrolled(state_scanned)
  assert jax.tree_util.tree_structure(round_trip) == jax.tree_util.tree_structure(state)
  for u, v in zip(jax.tree_util.tree_leaves(round_trip), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(u, v)
  # Shapes alone (to build an abstract target) and jax arrays convert too.
  abstract = models.to_unrolled(models.param_shapes(_tiny(num_blocks=3, scan=True), 16))
  assert jax.tree_util.tree_map(lambda s: s.shape, abstract) == jax.tree_util.tree_map(
      np.shape, params)
  on_device = models.to_scanned(jax.device_put(params))
  np.testing.assert_array_equal(on_device["MixerBlock"]["LayerNorm_0"]["scale"],
                                scanned["MixerBlock"]["LayerNorm_0"]["scale"])


def test_layout_conversion_checks_every_key():
  params = _random_params(_tiny(num_blocks=3), 16)
  gap = {k: v for k, v in params.items() if k != "MixerBlock_1"}
  with pytest.raises(ValueError, match="MixerBlock_1 is missing"):
    models.to_scanned(gap)
  odd = {**params, "MixerBlock_2": {**params["MixerBlock_2"], "extra": np.zeros(2)}}
  with pytest.raises(ValueError, match="^MixerBlock_2/extra has no counterpart in MixerBlock_0"):
    models.to_scanned(odd)
  wide = jax.tree_util.tree_map(lambda x: x, params)
  wide["MixerBlock_1"]["LayerNorm_0"]["scale"] = np.zeros(9, np.float32)
  with pytest.raises(ValueError, match=r"^MixerBlock_1/LayerNorm_0/scale has shape \(9,\)"):
    models.to_scanned(wide)
  mixed = {**models.to_scanned(params), "MixerBlock_0": params["MixerBlock_0"]}
  with pytest.raises(ValueError, match="mixes the two layouts"):
    models.to_unrolled(mixed)
  ragged = models.to_scanned(params)
  ragged["MixerBlock"]["LayerNorm_1"]["bias"] = np.zeros((2, 8), np.float32)
  with pytest.raises(ValueError, match="MixerBlock/LayerNorm_1/bias stacks 2 blocks"):
    models.to_unrolled(ragged)
  with pytest.raises(ValueError, match="holds no MixerBlock blocks"):
    models.layout({"stem": params["stem"]})
  with pytest.raises(ValueError, match="Unknown layout 'stacked'"):
    models.to_layout(params, "stacked")


def test_plain_model_supports_forward_mode_autodiff():
  # kernels="xla" is flax's own layers: jvp agrees with reverse mode, <J t, v> = <t, J^T v>.
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  model = _tiny(kernels="xla")
  params = _random_params(model, 16, scale=0.3)
  tangent = jax.tree_util.tree_map(jnp.ones_like, params)
  f = lambda p: model.apply({"params": p}, images, return_tokens=True)
  out, jvp_out = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(params, tangent)
  v = jax.random.normal(jax.random.key(1), out.shape)
  (cotangent,) = jax.jit(lambda p, v: jax.vjp(f, p)[1](v))(params, v)
  rhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(tangent),
                                          jax.tree_util.tree_leaves(cotangent)))
  np.testing.assert_allclose(jnp.vdot(jvp_out, v), rhs, rtol=1e-4)
  # And second derivatives (jax.hessian = jacfwd of jacrev), here in the stem's bias.
  def loss(bias):
    p = {**params, "stem": {**params["stem"], "bias": bias}}
    return jnp.sum(model.apply({"params": p}, images) ** 2)
  hess = jax.jit(jax.hessian(loss))(params["stem"]["bias"])
  assert hess.shape == (8, 8) and bool(jnp.all(jnp.isfinite(hess)))
  np.testing.assert_allclose(hess, hess.T, rtol=1e-4, atol=1e-6)


# ------------------------------------------------- parity with the released layout
def _np_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_mlp(x, p):
  h = _np_gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_mixer_block(x, p):
  """The paper's formula, written independently of the Flax code (float64)."""
  y = _np_layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
  x = x + _np_mlp(y.transpose(0, 2, 1), p["token_mixing"]).transpose(0, 2, 1)
  y = _np_layer_norm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"])
  return x + _np_mlp(y, p["channel_mixing"])


def np_mixer_forward(images, p, patch):
  """Whole forward pass in NumPy: stem as patch matmul, blocks, LN, pooling, head."""
  b, h, w, c = images.shape
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), -1)
  x = patches @ p["stem"]["kernel"].reshape(-1, p["stem"]["kernel"].shape[-1]) + p["stem"]["bias"]
  i = 0
  while f"MixerBlock_{i}" in p:
    x = np_mixer_block(x, p[f"MixerBlock_{i}"])
    i += 1
  x = _np_layer_norm(x, p["pre_head_layer_norm"]["scale"], p["pre_head_layer_norm"]["bias"])
  return x.mean(1) @ p["head"]["kernel"] + p["head"]["bias"]


def _float64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("kernels", KERNELS)
def test_one_block_matches_numpy_formula(kernels):
  block = kernel_sets.Intercepted(mixer.MixerBlock(tokens_mlp_dim=6, channels_mlp_dim=12),
                                  kernel_sets.interceptors(kernels))
  x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x))["params"]
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_unflatten(
      treedef, [rng.normal(0, 0.5, s.shape).astype(np.float32) for s in leaves])
  got = block.apply({"params": params}, x)
  np.testing.assert_allclose(got, np_mixer_block(x.astype(np.float64), _float64(params)),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernels", KERNELS)
def test_whole_model_matches_numpy_forward(kernels):
  model = _tiny(num_classes=7, kernels=kernels)
  params = _random_params(model, 16)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  got = model.apply({"params": params}, images)
  np.testing.assert_allclose(got, np_mixer_forward(images.astype(np.float64), _float64(params), 4),
                             rtol=1e-4, atol=1e-4)


_DATA_PARALLEL_GRADIENT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mixer_jax import kernels, models
model = kernels.Intercepted(models.from_preset(
    "S/4", 5, patch_size=4, num_blocks=2, hidden_dim=8, tokens_mlp_dim=6,
    channels_mlp_dim=12, dtype=DTYPE), kernels.interceptors("auto"))
params = models.init_params(model, 16)
mesh = Mesh(np.array(jax.devices()), ("data",))
images = jax.device_put(jnp.ones((16, 16, 16, 3)), NamedSharding(mesh, P("data")))
params = jax.device_put(params, NamedSharding(mesh, P()))
loss = lambda p, x: jnp.sum(model.apply({"params": p}, x, train=True) ** 2)
hlo = jax.jit(jax.grad(loss)).lower(params, images).compile().as_text()
print(hlo.count("all-gather("), hlo.count("all-reduce("))
"""


@pytest.mark.parametrize("dtype", ["float32"])
def test_data_parallel_gradient_gathers_no_activations(dtype):
  # Batch sharded over 4 devices, parameters replicated: the gradient needs only
  # all-reduces of the parameter gradients. (A token-major residual stream once made
  # the kernel gradients' row flattening gather the whole batch on every device.)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_GRADIENT.replace(
      "DTYPE", repr(dtype))], capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  gathers, reduces = map(int, out.stdout.split())
  assert gathers == 0 and reduces > 0, (gathers, reduces)


def test_summary_command_prints_count_and_flops():
  out = subprocess.run([sys.executable, "-m", "mixer_jax.tools.summary", "--variant=S/32",
                        "--notable"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "19,104,624 parameters" in out.stdout
  import json
  row = json.loads(out.stdout.strip().splitlines()[-1])
  # Forward FLOPs of S/32 at 224: ~1.0 GMAC -> ~2 GFLOPs (multiply-add counted as 2).
  assert 1.5e9 < row["forward_flops"] < 2.5e9
  bad = subprocess.run([sys.executable, "-m", "mixer_jax.tools.summary", "--variant=Q/3"],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode != 0 and "Unknown Mixer variant 'Q/3'" in bad.stderr


# ------------------------------------------------------ ResMLP and gMLP (timm's names)
# timm 1.0.31, 224x224, 1000 classes: sum(p.numel() for p in
# timm.create_model(name + "_224").parameters()).
TIMM_COUNTS = {
    "resmlp_12": 15_350_872, "resmlp_24": 30_020_680, "resmlp_36": 44_690_488,
    "resmlp_big_24": 129_138_280, "gmlp_ti16": 5_867_328, "gmlp_s16": 19_422_656,
    "gmlp_b16": 73_075_392,
}
FAMILY_TINY = dict(patch_size=4, num_blocks=3, hidden_dim=8, channels_mlp_dim=12)


@pytest.mark.parametrize("variant,expected", sorted(TIMM_COUNTS.items()))
def test_timm_parameter_counts_of_resmlp_and_gmlp(variant, expected):
  model = model_of(variant, 1000)
  assert models.count_params(models.param_shapes(model, 224)) == expected


def test_resmlp_and_gmlp_trees_and_options():
  res = models.param_shapes(model_of("resmlp_12", 10, **FAMILY_TINY), 16)
  assert jax.tree_util.tree_map(lambda s: s.shape, res["ResMlpBlock_2"]) == {
      "Affine_0": {"alpha": (8,), "beta": (8,)}, "token_mixing": {"kernel": (16, 16),
                                                                 "bias": (16,)},
      "LayerScale_0": {"scale": (8,)}, "Affine_1": {"alpha": (8,), "beta": (8,)},
      "channel_mixing": {"Dense_0": {"kernel": (8, 12), "bias": (12,)},
                         "Dense_1": {"kernel": (12, 8), "bias": (8,)}},
      "LayerScale_1": {"scale": (8,)}}
  assert set(res) == {"stem", "pre_head_affine", "head"} | {f"ResMlpBlock_{i}" for i in range(3)}
  gm = models.param_shapes(model_of("gmlp_s16", 10, **FAMILY_TINY), 16)
  assert jax.tree_util.tree_map(lambda s: s.shape, gm["GMlpBlock_0"]) == {
      "LayerNorm_0": {"scale": (8,), "bias": (8,)},
      "channel_proj_in": {"kernel": (8, 12), "bias": (12,)},
      "spatial_gating": {"LayerNorm_0": {"scale": (6,), "bias": (6,)},
                         "spatial_proj": {"kernel": (16, 16), "bias": (16,)}},
      "channel_proj_out": {"kernel": (6, 8), "bias": (8,)}}
  # LayerScale starts at timm's per-depth value; the gate at W ~ 0, b = 1; exact GELU.
  for variant, init in (("resmlp_12", 1e-4), ("resmlp_24", 1e-5), ("resmlp_36", 1e-6),
                        ("resmlp_big_24", 1e-6)):
    assert model_of(variant, 10).layerscale_init == init
  sgu = gmlp.SpatialGatingUnit().init(jax.random.key(0), jnp.ones((1, 16, 12)))["params"]
  proj = sgu["spatial_proj"]
  assert np.abs(proj["kernel"]).max() < 1e-5 and np.all(proj["bias"] == 1.0)
  assert not model_of("gmlp_s16", 10).approximate_gelu
  assert model_of("resmlp_12", 10, approximate_gelu=True).approximate_gelu
  # An odd gMLP channels_mlp_dim is refused by state.resolve_model (test above); a
  # field the module lacks is refused by its constructor.
  with pytest.raises(TypeError, match="tokens_mlp_dim"):
    models.from_preset("resmlp_12", 10, tokens_mlp_dim=4)


@pytest.mark.parametrize("variant", ["resmlp_12", "gmlp_s16"])
def test_resmlp_and_gmlp_scan_remat_stochastic_depth_and_bfloat16(variant):
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  tiny = dict(FAMILY_TINY, num_blocks=2)
  plain = model_of(variant, 5, **tiny, kernels="xla")
  params = _random_params(plain, 16, scale=0.3)
  scanned = plain.clone(scan=True, remat_policy="full")
  shapes = models.param_shapes(scanned, 16)
  block = "ResMlpBlock" if variant.startswith("resmlp") else "GMlpBlock"
  assert set(shapes) - {"stem", "head", "pre_head_affine", "pre_head_layer_norm"} == {block}
  assert models.layout(shapes) == models.SCANNED and models.is_stacked(f"x/{block}/y")

  def both(p):  # The same loss (gMLP: and gradients) unrolled, and scanned with remat.
    loss = lambda m, q: jnp.sum(jnp.sin(m.apply({"params": q}, images)))
    if variant.startswith("resmlp"):  # Both run blocks.run_blocks: gradients once.
      return loss(plain, p), {}, loss(scanned, models.to_scanned(p)), {}
    a, ga = jax.value_and_grad(functools.partial(loss, plain))(p)
    b, gb = jax.value_and_grad(functools.partial(loss, scanned))(models.to_scanned(p))
    return a, ga, b, models.to_unrolled(gb)

  a, ga, b, gb = jax.jit(both)(params)
  assert abs(float(a)) > 0.01
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for u, v in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
  # Stochastic depth: a function of the rng (the rate array traced, as under scan).
  training = plain.clone(stoch_depth=0.5)
  drop = jax.jit(lambda p, seed: training.apply({"params": p}, images, train=True,
                                                rngs={"dropout": jax.random.key(seed)}))
  np.testing.assert_array_equal(drop(params, 0), drop(params, 0))
  assert not np.allclose(drop(params, 0), drop(params, 1))
  # bfloat16 compute: float32 parameters and logits, bfloat16 activations.
  half = model_of(variant, 5, **tiny, dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(
      models.param_shapes(half, 16)))
  logits, inter = jax.eval_shape(lambda p: half.apply(
      {"params": p}, images, capture_intermediates=True, mutable=["intermediates"]), params)
  assert logits.dtype == jnp.float32
  assert inter["intermediates"][f"{block}_1"]["__call__"][0].dtype == jnp.bfloat16
