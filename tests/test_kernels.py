"""mixer_jax.kernels: each fast form equals its plain twin, in values and gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mixer_jax import kernels, models
from mixer_jax.kernels import cpu
from mixer_jax.models import mixer

# float32: summation order only; bfloat16: a few units of its 8-bit mantissa.
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [jnp.float32, jnp.bfloat16]


def _assert_close(a, b, dtype):
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL[dtype])


def _values_and_grads(f, *args):
  """f(*args) and the gradient of a scalar of it with respect to every argument."""
  weights = jax.random.normal(jax.random.key(9), jax.eval_shape(f, *args).shape)
  loss = lambda *a: jnp.sum(weights * f(*a).astype(jnp.float32))
  # Jitted: one compile each, instead of dispatching every op of a model on its own.
  return jax.jit(f)(*args), jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def _same(fast, plain, args, dtype):
  (y, grads), (y_ref, grads_ref) = _values_and_grads(fast, *args), _values_and_grads(plain, *args)
  _assert_close(y, y_ref, dtype)
  leaves = jax.tree_util.tree_leaves
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads_ref)
  for g, g_ref in zip(leaves(grads), leaves(grads_ref)):
    _assert_close(g, g_ref, dtype)


def _normal(seed, shape, dtype):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


# ------------------------------------------------------------------------ matmul
DENSE = (((2,), (0,)), ((), ()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [24, 3])  # Kernel gradient: x first, then g first.
def test_dot_general_equals_lax_for_a_dense_product(features, dtype):
  x, kernel = _normal(0, (4, 5, 6), dtype), _normal(1, (6, features), dtype)
  _same(lambda x, k: cpu.dot_general(x, k, DENSE), lambda x, k: lax.dot_general(x, k, DENSE),
        (x, kernel), dtype)


def test_dot_general_passes_other_products_to_lax():
  a, b = _normal(0, (3, 4, 5), jnp.float32), _normal(1, (3, 5, 2), jnp.float32)
  batched = (((2,), (1,)), ((0,), (0,)))
  _same(lambda a, b: cpu.dot_general(a, b, batched), lambda a, b: lax.dot_general(a, b, batched),
        (a, b), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda a, b: cpu.dot_general(a, b, batched))(a, b)
  assert "custom_vjp" not in str(jaxpr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_x,rows_g", [(12, 40), (40, 12)])
def test_kernel_grad_equals_the_plain_product(rows_x, rows_g, dtype):
  x, g = _normal(0, (30, rows_x), dtype), _normal(1, (30, rows_g), dtype)
  _assert_close(cpu.kernel_grad(x, g), lax.dot_general(x, g, (((0,), (0,)), ((), ()))), dtype)


def _lhs_contracting_dims(block, x):
  """lhs_contracting_dims of every matmul XLA compiles for the block's gradient."""
  params = block.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(block.apply(p, x) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  return re.findall(r" dot\(.*?lhs_contracting_dims=\{([\d,]*)\}", hlo)


def _cpu(module):
  """`module` computed with the cpu forms: kernels/cpu.py's interceptor around apply."""
  return kernels.Intercepted(module, (cpu.intercept,))


def test_every_matmul_of_a_block_gradient_contracts_the_left_operand_over_its_last_axis():
  # The reason for cpu.dot_general: XLA's CPU backend runs a matmul in its fast library
  # only in that form; autodiff's kernel gradients contract over the first axis, as the
  # plain block shows (so the check can fail).
  x = jnp.ones((2, 7, 16))
  fast = _lhs_contracting_dims(_cpu(mixer.MixerBlock(32, 64)), x)
  plain = _lhs_contracting_dims(mixer.MixerBlock(32, 64), x)
  assert len(fast) == 12 and set(fast) == {"1"}, fast
  assert "0" in plain, plain


# -------------------------------------------------------------------------- stem
CONV = dict(window_strides=(4, 4), padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_embedding_equals_the_strided_conv(dtype):
  images, kernel = _normal(0, (2, 8, 12, 3), dtype), _normal(1, (4, 4, 3, 5), dtype)
  _same(lambda x, k: cpu.conv_general_dilated(x, k, **CONV),
        lambda x, k: lax.conv_general_dilated(x, k, **CONV), (images, kernel), dtype)
  jaxpr = str(jax.make_jaxpr(lambda x, k: cpu.conv_general_dilated(x, k, **CONV))(images, kernel))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


@pytest.mark.parametrize("kw", [dict(window_strides=(2, 2)),  # Overlapping patches.
                                dict(padding="SAME"), dict(rhs_dilation=(2, 1))])
def test_other_convolutions_go_to_lax(kw):
  images, kernel = _normal(0, (1, 8, 8, 3), jnp.float32), _normal(1, (4, 4, 3, 2), jnp.float32)
  kw = dict(CONV, **kw)
  _same(lambda x, k: cpu.conv_general_dilated(x, k, **kw),
        lambda x, k: lax.conv_general_dilated(x, k, **kw), (images, kernel), jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flax_conv_through_the_seam_equals_flax_conv(dtype):
  images = jax.random.uniform(jax.random.key(1), (2, 32, 48, 3), minval=-1, maxval=1)
  kw = dict(features=8, kernel_size=(16, 16), strides=(16, 16), padding="VALID", dtype=dtype)
  fast, plain = _cpu(nn.Conv(**kw)), nn.Conv(**kw)
  params = plain.init(jax.random.key(2), images)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(  # Same tree, same initial values.
      lambda a, b: bool(jnp.all(a == b)), fast.init(jax.random.key(2), images), params))
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # A non-zero bias too.
  _same(lambda p: fast.apply(p, images), lambda p: plain.apply(p, images), (params,), dtype)


# -------------------------------------------------------------------------- GELU
# -------------------------------------------------------------------- the model
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_kernels_model_equals_the_plain_model(dtype):
  fields = dict(patch_size=4, num_blocks=2, hidden_dim=8, tokens_mlp_dim=6,
                channels_mlp_dim=12, dtype=dtype)
  plain = models.from_preset("S/4", 5, **fields)
  fast = kernels.Intercepted(plain, kernels.interceptors("cpu"))  # As state.Setup does.
  params = jax.tree_util.tree_map(
      lambda s: 0.3 * jax.random.normal(jax.random.key(s.size), s.shape),
      models.param_shapes(plain, 16))
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
  run = lambda model: lambda p: model.apply({"params": p}, images, train=True)
  (y, (g,)), (y_ref, (g_ref,)) = (_values_and_grads(run(m), params) for m in (fast, plain))
  tol = TOL[jnp.float32] if dtype == "float32" else dict(rtol=5e-2, atol=5e-2)
  np.testing.assert_allclose(y, y_ref, **tol)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, **tol)
