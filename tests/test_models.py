"""The model zoo: exact parameter counts, shapes, features, errors, numerics."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# REFERENCE.md: 224x224, 1000 classes.
PAPER_COUNTS = {
    "S/32": 19_104_624, "S/16": 18_528_264, "B/32": 60_293_428, "B/16": 59_880_472,
    "L/32": 206_939_264, "L/16": 208_196_168, "H/14": 432_350_952,
}
TINY = dict(patch_size=4, num_blocks=2, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=12)


@pytest.mark.parametrize("variant,expected", sorted(PAPER_COUNTS.items()))
def test_paper_parameter_counts(variant, expected):
  model = models.create_model(variant, 1000)
  assert models.count_params(models.param_shapes(model, 224)) == expected


def test_headless_counts_match_reference():
  for variant, headless in (("S/32", 18_591_624), ("H/14", 431_069_952)):
    model = models.create_model(variant, 0)
    assert models.count_params(models.param_shapes(model, 224)) == headless


def test_module_tree_matches_released_layout():
  shapes = models.param_shapes(models.create_model("B/16", 1000), 224)
  assert set(shapes) == {"stem", "pre_head_layer_norm", "head"} | {
      f"MixerBlock_{i}" for i in range(12)}
  block = jax.tree_util.tree_map(lambda s: s.shape, shapes["MixerBlock_3"])
  assert block["token_mixing"]["Dense_0"]["kernel"] == (196, 384)
  assert block["token_mixing"]["Dense_1"]["kernel"] == (384, 196)
  assert block["channel_mixing"]["Dense_0"]["kernel"] == (768, 3072)
  assert block["channel_mixing"]["Dense_1"]["kernel"] == (3072, 768)
  assert block["LayerNorm_0"]["scale"] == (768,) and block["LayerNorm_1"]["bias"] == (768,)
  assert shapes["stem"]["kernel"].shape == (16, 16, 3, 768)
  assert shapes["head"]["kernel"].shape == (768, 1000)


def _tiny(num_classes=5, **kw):
  fields = dict(TINY, **kw)
  return models.create_model("S/4", num_classes, **fields)


def test_forward_shapes_features_and_tokens():
  images = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
  model = _tiny()
  params = models.init_params(model, 16)
  logits = model.apply({"params": params}, images, train=False)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)  # Zero-initialised head.
  features = _tiny(num_classes=0)
  feats = features.apply({"params": {k: v for k, v in params.items() if k != "head"}}, images)
  assert feats.shape == (2, 8)
  tokens = model.apply({"params": params}, images, return_tokens=True)
  assert tokens.shape == (2, 16, 8)
  np.testing.assert_allclose(tokens.mean(axis=1), feats, rtol=1e-6, atol=1e-6)
  assert models.create_model("S/4", None, **TINY).num_classes is None


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/0", "b/16", "B/-2", ""])
def test_unknown_variant_raises(variant):
  with pytest.raises(ValueError, match="variant"):
    models.create_model(variant, 10)


@pytest.mark.parametrize("field,value", [("hidden_dim", 0), ("num_blocks", -1),
                                         ("patch_size", 0), ("tokens_mlp_dim", 2.5)])
def test_non_positive_size_raises(field, value):
  with pytest.raises(ValueError, match=field):
    _tiny(**{field: value})


def test_other_bad_inputs_raise():
  with pytest.raises(ValueError, match="num_classes"):
    models.create_model("B/16", -3)
  with pytest.raises(ValueError, match="Unknown model field"):
    models.create_model("B/16", 10, hiden_dim=3)
  with pytest.raises(ValueError, match="stoch_depth"):
    models.create_model("B/16", 10, stoch_depth=1.5)
  with pytest.raises(ValueError, match="dtype"):
    models.create_model("B/16", 10, dtype="float8")


def test_image_side_not_divisible_by_patch_raises():
  model = models.create_model("B/16", 10)
  with pytest.raises(ValueError, match="Image side 200 is not divisible by the patch size 16"):
    models.param_shapes(model, 200)


def test_stochastic_depth_eval_is_deterministic_and_train_drops():
  model = _tiny(stoch_depth=0.5, num_blocks=4)
  params = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape) * 0.3,
      models.init_params(model, 16))
  images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1)
  apply = lambda seed, train: model.apply({"params": params}, images, train=train,
                                          rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(apply(0, False), apply(1, False))
  np.testing.assert_array_equal(apply(3, True), apply(3, True))
  assert not np.allclose(apply(0, True), apply(1, True))


def test_drop_path_survival_rate_and_rescaling():
  x = jnp.ones((20_000, 3, 2))
  rate = 0.3
  y = models.drop_path(x, rate, jax.random.key(0))
  per_example = np.asarray(y[:, 0, 0])
  kept = per_example != 0
  # All of an example's branch is kept or dropped together (per-example decision).
  np.testing.assert_array_equal(np.asarray(y != 0).all(axis=(1, 2)), kept)
  assert abs(kept.mean() - (1 - rate)) < 0.015
  np.testing.assert_allclose(per_example[kept], 1 / (1 - rate), rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 0.03  # Expected value preserved.


def test_stochastic_depth_rates_rise_linearly_over_blocks():
  import flax.linen as nn
  model = _tiny(stoch_depth=0.3, num_blocks=4)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.MixerBlock) and context.method_name == "__call__":
      seen[context.module.name] = context.module.stoch_depth
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  np.testing.assert_allclose([seen[f"MixerBlock_{i}"] for i in range(4)],
                             [0.0, 0.1, 0.2, 0.3], atol=1e-9)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype="bfloat16")
  params = models.init_params(model, 16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  images = jnp.zeros((2, 16, 16, 3))
  logits, state = model.apply({"params": params}, images, capture_intermediates=True,
                              mutable=["intermediates"])
  assert logits.dtype == jnp.float32
  dense = state["intermediates"]["MixerBlock_0"]["channel_mixing"]["Dense_0"]["__call__"][0]
  assert dense.dtype == jnp.bfloat16


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("features", [24, 3])  # Output wider, then narrower, than the input.
def test_dense_equals_flax_dense_in_value_and_gradients(features, columns):
  # models.Dense hand-orders its matmuls; its parameters, outputs and gradients must
  # still be nn.Dense's (with columns=True: nn.Dense applied to each column).
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (6, 20) if columns else (4, 5, 6))
  ours, flax_dense = models.Dense(features, columns=columns), nn.Dense(features)
  flax_apply = lambda p, x: flax_dense.apply(p, x.T).T if columns else flax_dense.apply(p, x)
  params = ours.init(jax.random.key(1), x)
  assert (jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
      jnp.shape, flax_dense.init(jax.random.key(1), x.T if columns else x)))
  loss = lambda apply: lambda p, x: jnp.sum(jnp.sin(apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), flax_apply(params, x), rtol=1e-6,
                             atol=1e-6)
  ours_grads = jax.grad(loss(ours.apply), argnums=(0, 1))(params, x)
  flax_grads = jax.grad(loss(flax_apply), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(ours_grads), jax.tree_util.tree_leaves(flax_grads)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,epsilon,extra", [
    (jnp.float32, models.LAYER_NORM_EPSILON, {}), (jnp.bfloat16, models.LAYER_NORM_EPSILON, {}),
    (jnp.float32, 0.5, {}),  # The module's epsilon is the one used.
    (jnp.float32, 1e-6, {"use_bias": False}),  # Other settings: flax's own LayerNorm.
])
def test_layer_norm_equals_flax_layer_norm_in_value_and_gradients(dtype, epsilon, extra):
  # models.LayerNorm has its own backward pass; its parameters, outputs and gradients
  # must still be nn.LayerNorm's.
  import flax.linen as nn
  x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 5, 16))).astype(dtype)
  kw = dict(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, **extra)
  ours, theirs = models.LayerNorm(**kw), nn.LayerNorm(**kw)
  params = ours.init(jax.random.key(1), x)
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
      jnp.shape, theirs.init(jax.random.key(1), x))
  params = jax.tree_util.tree_map(  # Not the identity: scale 1 and bias 0 hide mistakes.
      lambda p: p + jax.random.normal(jax.random.key(p.size), p.shape), params)
  y = ours.apply(params, x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(y, theirs.apply(params, x))  # The same arithmetic.
  weights = jax.random.normal(jax.random.key(2), x.shape)
  loss = lambda module: lambda p, x: jnp.sum(weights * module.apply(p, x).astype(jnp.float32))
  tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=0.02, atol=0.05)
  ours_grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  flax_grads = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(ours_grads), jax.tree_util.tree_leaves(flax_grads)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_gelu_derivatives_equal_the_tanh_formulas():
  x = jnp.linspace(-8.0, 8.0, 2001)
  tanh_form = lambda x: jax.nn.gelu(x, approximate=True)
  for f, g in [(models.gelu, tanh_form), (jax.grad(models.gelu), jax.grad(tanh_form)),
               (jax.grad(jax.grad(models.gelu)), jax.grad(jax.grad(tanh_form)))]:
    np.testing.assert_allclose(jax.vmap(f)(x), jax.vmap(g)(x), rtol=1e-4, atol=5e-5)


def test_gelu_derivative_is_recomputed_not_kept_from_the_forward_pass():
  # bias_gelu's backward recomputes the derivative from the matmul output; without its
  # barrier XLA merges that with the forward pass's sigmoid (one exponential in all), so
  # the forward pass would write the sigmoid for the backward pass to read.
  block = models.MlpBlock(mlp_dim=64, dtype=jnp.bfloat16)
  x = jnp.ones((128, 32), jnp.bfloat16)
  params = block.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x).astype(jnp.float32) ** 2)))
  hlo = grad.lower(params, x).compile().as_text()
  assert len(re.findall(r"= \S+ (?:exponential|logistic)\(", hlo)) == 2


def test_backward_pass_keeps_no_float32_activations_in_bfloat16():
  # What the train step keeps from forward to backward, in bfloat16 compute: no float32
  # array of the activations' size (LayerNorm's autodiff kept three per norm), and two
  # arrays of the MLP hidden size (autodiff kept five): the first Dense's output, which
  # the GELU's backward pass reads, and the GELU's output, the second Dense's input.
  model = _tiny(dtype="bfloat16", num_blocks=1)
  params = models.init_params(model, 16)
  images = jnp.zeros((2, 16, 16, 3))
  _, vjp = jax.vjp(lambda p: model.apply({"params": p}, images, train=True), params)
  kept = [a for a in jax.tree_util.tree_leaves(vjp) if hasattr(a, "dtype")]
  activation = 2 * 16 * 8  # batch x tokens x channels
  assert not [a.shape for a in kept if a.dtype == jnp.float32 and a.size >= activation]
  channel_hidden = [a for a in kept if a.shape == (2, 16, 12)]  # batch x tokens x hidden
  assert len(channel_hidden) == 2, [a.shape for a in channel_hidden]


@pytest.mark.parametrize("columns", [False, True])
def test_dense_with_fused_gelu_equals_gelu_after_dense(columns):
  x = jax.random.normal(jax.random.key(0), (6, 20) if columns else (4, 5, 6))
  fused, plain = models.Dense(7, columns=columns, gelu=True), models.Dense(7, columns=columns)
  params = plain.init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(lambda p: p + 0.3, params)  # A non-zero bias.
  plain_apply = lambda p, x: models.gelu(plain.apply(p, x))
  np.testing.assert_allclose(fused.apply(params, x), plain_apply(params, x), rtol=1e-6,
                             atol=1e-6)
  loss = lambda apply: lambda p, x: jnp.sum(jnp.sin(3.0 * apply(p, x)))
  fused_grads = jax.grad(loss(fused.apply), argnums=(0, 1))(params, x)
  plain_grads = jax.grad(loss(plain_apply), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(fused_grads), jax.tree_util.tree_leaves(plain_grads)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="use_bias"):
    models.Dense(7, gelu=True, use_bias=False).init(jax.random.key(0), x)


def test_bias_gelu_gradients_have_the_inputs_shapes_and_dtypes():
  for y, bias in [(jnp.ones((4, 3)), jnp.ones(3, jnp.bfloat16)),  # Mixed dtypes.
                  (jnp.linspace(-2, 2, 4).reshape(4, 1), jnp.linspace(-1, 1, 3))]:  # y broadcast.
    f = lambda y, b: jnp.sum(jnp.sin(models.bias_gelu(y, b)))
    g = lambda y, b: jnp.sum(jnp.sin(models.gelu(y + b)))
    ours, plain = jax.grad(f, (0, 1))(y, bias), jax.grad(g, (0, 1))(y, bias)
    for a, b, primal in zip(ours, plain, (y, bias)):
      assert a.shape == primal.shape and a.dtype == primal.dtype
      np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-2, atol=1e-2)


def test_forward_mode_ad_option_gives_jvp_and_same_outputs():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  default, forward = _tiny(), _tiny(forward_mode_ad=True)
  params = models.init_params(default, 16)
  tangent = jax.tree_util.tree_map(jnp.ones_like, params)
  f = lambda model: lambda p: model.apply({"params": p}, images, return_tokens=True)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(f(default), (params,), (tangent,))  # The custom VJP has no forward mode.
  out, jvp_out = jax.jvp(f(forward), (params,), (tangent,))
  np.testing.assert_allclose(out, f(default)(params), rtol=1e-5, atol=1e-6)
  # Forward mode agrees with reverse mode of the default model: <J t, v> = <t, J^T v>.
  v = jax.random.normal(jax.random.key(1), out.shape)
  _, vjp = jax.vjp(f(default), params)
  (cotangent,) = vjp(v)
  lhs = jnp.vdot(jvp_out, v)
  rhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(tangent),
                                          jax.tree_util.tree_leaves(cotangent)))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def _lhs_contracting_dims(block, x, gradient=True):
  """lhs_contracting_dims of every matmul XLA compiles for the block's gradient (or
  its forward pass alone)."""
  params = block.init(jax.random.key(0), x)
  forward = lambda p, x: jnp.sum(block.apply(p, x) ** 2)
  fn = jax.jit(jax.grad(forward, argnums=(0, 1)) if gradient else forward)
  hlo = fn.lower(params, x).compile().as_text()
  return re.findall(r" dot\(.*?lhs_contracting_dims=\{([\d,]*)\}", hlo)


@pytest.mark.parametrize("columns", [False, True])
def test_mlp_block_matmuls_contract_the_left_operand_over_its_last_axis(columns):
  # The reason for models.Dense's custom VJP: XLA's CPU backend runs a matmul in its
  # fast library only when the left operand is contracted over its last axis;
  # autodiff's kernel gradients (and the columns layout's forward) contract it over
  # the first. The plain products (forward_mode_ad=True) show the check can fail.
  x = jnp.ones((16, 14)) if columns else jnp.ones((2, 7, 16))
  ours = _lhs_contracting_dims(models.MlpBlock(mlp_dim=64, columns=columns), x)
  plain = _lhs_contracting_dims(
      models.MlpBlock(mlp_dim=64, columns=columns, forward_mode_ad=True), x)
  assert len(ours) == 6 and set(ours) == {"1"}, ours
  assert "0" in plain, plain
  forward_only = _lhs_contracting_dims(models.MlpBlock(mlp_dim=64, columns=columns), x,
                                       gradient=False)  # Evaluation: no custom VJP rule.
  assert len(forward_only) == 2 and set(forward_only) == {"1"}, forward_only


@pytest.mark.parametrize("columns", [False, True])
def test_accelerators_get_the_plain_products(columns):
  # The transposed copies are for XLA's CPU backend only: lowered for a GPU or TPU
  # (no device needed to lower), the gradient's one optimization barrier is bias_gelu's
  # (its recomputation of the GELU derivative), where CPU has more.
  from jax import export
  block = models.MlpBlock(mlp_dim=64, columns=columns)
  x = jnp.ones((16, 14)) if columns else jnp.ones((2, 7, 16))
  params = block.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2), argnums=(0, 1)))
  lowered = {platform: export.export(grad, platforms=[platform])(params, x).mlir_module()
             for platform in ("cpu", "cuda", "tpu")}
  barriers = {k: v.count("stablehlo.optimization_barrier") for k, v in lowered.items()}
  assert barriers["cuda"] == barriers["tpu"] == 1 < barriers["cpu"], barriers


@pytest.mark.parametrize("rows_x,rows_g", [(12, 40), (40, 12)])
def test_cpu_and_plain_kernel_gradients_agree(rows_x, rows_g):
  # Both branches of lax.platform_dependent, run here on the CPU.
  x = jax.random.normal(jax.random.key(0), (30, rows_x))
  g = jax.random.normal(jax.random.key(1), (30, rows_g))
  np.testing.assert_allclose(models._kernel_grad_cpu(x, g), models._kernel_grad(x, g),
                             rtol=1e-5, atol=1e-5)
  kernel = jax.random.normal(jax.random.key(2), (30, rows_g))
  np.testing.assert_allclose(models._product_columns_cpu(x, kernel),
                             models._product_columns(x, kernel), rtol=1e-5, atol=1e-5)


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


def random_params(model, image_size, seed=0):
  shapes = models.param_shapes(model, image_size)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [rng.normal(0, 0.5, s.shape).astype(np.float32) for s in leaves])


def test_one_block_matches_numpy_formula():
  block = models.MixerBlock(tokens_mlp_dim=6, channels_mlp_dim=12)
  x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x))["params"]
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_unflatten(
      treedef, [rng.normal(0, 0.5, s.shape).astype(np.float32) for s in leaves])
  got = block.apply({"params": params}, x)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(got, np_mixer_block(x.astype(np.float64), p64), rtol=2e-5, atol=2e-5)


def test_whole_model_matches_numpy_forward():
  model = _tiny(num_classes=7)
  params = random_params(model, 16)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  got = model.apply({"params": params}, images)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(got, np_mixer_forward(images.astype(np.float64), p64, 4),
                             rtol=1e-4, atol=1e-4)


_DATA_PARALLEL_GRADIENT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mixer_jax import models
model = models.create_model("S/4", 5, patch_size=4, num_blocks=2, hidden_dim=8,
                            tokens_mlp_dim=6, channels_mlp_dim=12, dtype=DTYPE)
params = models.init_params(model, 16)
mesh = Mesh(np.array(jax.devices()), ("data",))
images = jax.device_put(jnp.ones((16, 16, 16, 3)), NamedSharding(mesh, P("data")))
params = jax.device_put(params, NamedSharding(mesh, P()))
loss = lambda p, x: jnp.sum(model.apply({"params": p}, x, train=True) ** 2)
hlo = jax.jit(jax.grad(loss)).lower(params, images).compile().as_text()
print(hlo.count("all-gather("), hlo.count("all-reduce("))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
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
  out = subprocess.run([sys.executable, "-m", "mixer_jax.summary", "--variant=S/32",
                        "--notable"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "19,104,624 parameters" in out.stdout
  import json
  row = json.loads(out.stdout.strip().splitlines()[-1])
  # Forward FLOPs of S/32 at 224: ~1.0 GMAC -> ~2 GFLOPs (multiply-add counted as 2).
  assert 1.5e9 < row["forward_flops"] < 2.5e9
  bad = subprocess.run([sys.executable, "-m", "mixer_jax.summary", "--variant=Q/3"],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode != 0 and "Unknown Mixer variant 'Q/3'" in bad.stderr
