"""mixer_jax.kernels.pallas: each kernel equals its plain twin, in values and gradients.

On this CPU the kernels run in Pallas's interpreter, with blocks small enough that
every shape here leaves partial blocks (rows, columns and the matmul depth), and the
GPU programs are only lowered (to Triton IR, for CUDA) on the B/16 shapes. What the
kernels buy on a GPU is benchmarks/gpu_pallas.py's to measure.
"""

import logging
import re

import flax.linen as nn
import jaxlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import kernels, models
from mixer_jax.kernels import pallas
from mixer_jax.models import layers

# Blocks of 16 (Triton's smallest dot), LayerNorm blocks of 2 rows over 4 programs.
TILES = pallas.Tiles(block_m=16, block_n=16, block_k=16, ln_elements=64, ln_programs=4,
                     interpret=True)
DTYPES = [jnp.float32, jnp.bfloat16]
# Relative to the largest reference value: float32 summation order; bfloat16 rounding
# (the kernels round once from float32, the plain forms after every op).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _normal(seed, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _assert_close(a, b, dtype):
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=0, atol=TOL[dtype] * max(1.0, np.abs(b).max()))


def _values_and_grads(f, args):
  """f(*args) and the gradient of a weighted sum of it in every argument, one jit."""
  weights = jax.random.normal(jax.random.key(9), jax.eval_shape(f, *args).shape)
  loss = lambda *a: jnp.sum(weights * f(*a).astype(jnp.float32))
  grads = jax.grad(loss, argnums=tuple(range(len(args))))
  return jax.jit(lambda *a: (f(*a), grads(*a)))(*args)


def _same(fast, plain, args, dtype):
  (y, grads), (y_ref, grads_ref) = _values_and_grads(fast, args), _values_and_grads(plain, args)
  _assert_close(y, y_ref, dtype)
  for g, g_ref in zip(grads, grads_ref):
    _assert_close(g, g_ref, dtype)


# -------------------------------------------------------------------------- GELU
def test_gelu_and_its_derivative_are_the_models():
  h = jnp.linspace(-6.0, 6.0, 101)
  ours, ours_grad, theirs, their_grad = jax.jit(lambda h: (
      pallas._gelu_f32(h), pallas._gelu_grad_f32(h), layers.gelu(h),
      jax.vmap(jax.grad(layers.gelu))(h)))(h)
  assert pallas.gelu(h).dtype == theirs.dtype
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_equals_the_plain_form(dtype):
  # 37 rows of 20: blocks of 2 x 32, the last one half empty; 4 backward programs of 5
  # blocks each, the last one partly past the end.
  x = _normal(0, (37, 20), dtype, 2.0) + 0.5
  scale, bias = 1.0 + _normal(1, (20,), jnp.float32, 0.3), _normal(2, (20,), jnp.float32, 0.3)
  _same(lambda x, s, b: pallas.layer_norm(x, s, b, dtype=dtype, tiles=TILES),
        lambda x, s, b: pallas.layer_norm_plain(x, s, b, dtype=dtype), (x, scale, bias), dtype)


def test_layer_norm_plain_form_is_flax_layer_norm():
  x = _normal(0, (3, 5, 20), jnp.bfloat16)
  ln = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)
  params = {"params": {"scale": 1.0 + _normal(3, (20,), jnp.float32, 0.2),
                       "bias": _normal(4, (20,), jnp.float32, 0.2)}}
  plain = lambda p, x: pallas.layer_norm_plain(x, p["params"]["scale"], p["params"]["bias"],
                                               dtype=jnp.bfloat16)
  np.testing.assert_array_equal(jax.jit(ln.apply)(params, x), jax.jit(plain)(params, x))


# ------------------------------------------------------------------------ matmuls
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_matmul_kernel_equals_its_plain_form(dtype):
  # 37 x 40 @ 40 x 24: 3 x 2 tiles of 16, 3 depth steps, every last one partial.
  x, w, b = _normal(0, (37, 40), dtype), _normal(1, (40, 24), dtype, 0.2), _normal(2, (24,), dtype)
  g, w2t = _normal(3, (37, 40), dtype), _normal(4, (40, 24), dtype, 0.2)

  def both(kernel_forms):
    y, h = ((lambda: pallas.dense_gelu(x, w, b, tiles=TILES, with_preactivation=True))
            if kernel_forms else (lambda: (pallas.dense_gelu_plain(x, w, b), pallas._dense(x, w, b))))()
    dh, db = (pallas.gelu_grad_matmul(g, w2t, h, tiles=TILES) if kernel_forms
              else pallas.gelu_grad_matmul_plain(g, w2t, h))
    return y, h, dh, db

  fast, plain = jax.jit(lambda: both(True))(), jax.jit(lambda: both(False))()
  for a, b in zip(fast, plain):
    _assert_close(a, b, dtype)
  assert fast[3].dtype == jnp.float32  # Bias-gradient sums stay float32.


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_equals_the_plain_form(dtype):
  x = _normal(0, (2, 19, 40), dtype)  # 38 rows.
  w1, b1 = _normal(1, (40, 24), dtype, 0.2), _normal(2, (24,), dtype, 0.3)
  w2, b2 = _normal(3, (24, 40), dtype, 0.2), _normal(4, (40,), dtype, 0.3)
  _same(lambda *a: pallas.mlp(*a, tiles=TILES), pallas.mlp_plain, (x, w1, b1, w2, b2), dtype)


# ------------------------------------------------------------- the model's seams
def test_model_with_the_kernels_equals_the_plain_model():
  # One block (its two LayerNorms and MLPs) and the pre-head LayerNorm, in bfloat16: the
  # modules' casts too; the float32 arithmetic is the kernel tests' above.
  dtype = "bfloat16"
  fields = dict(patch_size=4, num_blocks=1, hidden_dim=8, tokens_mlp_dim=6,
                channels_mlp_dim=12, dtype=dtype)
  plain = models.from_preset("S/4", 5, **fields)
  fast = kernels.Intercepted(plain, (pallas.interceptor(TILES),))  # Interpret mode.
  shapes = models.param_shapes(plain, 16)
  assert models.param_shapes(fast, 16) == shapes  # The released tree.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                                  shapes)
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
  run = lambda model: lambda p: model.apply({"params": p}, images, train=True)
  (y, (g,)), (y_ref, (g_ref,)) = (_values_and_grads(run(m), (params,)) for m in (fast, plain))
  _assert_close(y, y_ref, jnp.dtype(dtype).type)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    assert a.dtype == jnp.float32
    _assert_close(a, b, jnp.dtype(dtype).type)


def test_fused_block_parameters_initialise_as_flax_dense():
  ours = pallas._DenseParams(12).init(jax.random.key(3), 8)
  theirs = nn.Dense(12).init(jax.random.key(3), jnp.ones((2, 8)))
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
    np.testing.assert_array_equal(a, b)


def test_kernels_pallas_is_chosen_by_name_only_and_keeps_the_released_tree():
  (intercept,) = kernels.interceptors("pallas")
  assert kernels.interceptors("auto") != (intercept,)
  plain = models.from_preset("B/16", 1000)
  model = kernels.Intercepted(plain, (intercept,))
  shapes = lambda m: jax.tree_util.tree_map(lambda s: s.shape, models.param_shapes(m, 224))
  assert shapes(model) == shapes(plain)


def test_mlp_block_with_dropout_in_training_is_the_plain_block():
  x, kw = _normal(0, (2, 5, 8), jnp.float32), dict(train=True, rngs={"dropout": jax.random.key(1)})
  plain = layers.MlpBlock(12, dropout=0.5)
  fast = kernels.Intercepted(plain, (pallas.interceptor(TILES),))
  params = jax.eval_shape(lambda: plain.init(jax.random.key(0), x))
  fast_jaxpr, plain_jaxpr = (str(jax.make_jaxpr(lambda p: m.apply(p, x, **kw))(params))
                             for m in (fast, plain))
  assert fast_jaxpr == plain_jaxpr and "pallas_call" not in fast_jaxpr


def test_without_a_gpu_the_modules_run_flax_layers_and_log_it_once(caplog):
  pallas._gpu_available.cache_clear()
  x = _normal(0, (2, 5, 8), jnp.float32)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      for fast in (kernels.Intercepted(nn.LayerNorm(), (pallas.interceptor(),)),
                   kernels.Intercepted(layers.MlpBlock(12), (pallas.interceptor(),))):
        params = jax.eval_shape(lambda: fast.init(jax.random.key(0), x))
        assert "pallas_call" not in str(jax.make_jaxpr(lambda p: fast.apply(p, x))(params))
  lines = [r.getMessage() for r in caplog.records if "kernels='pallas'" in r.getMessage()]
  assert len(lines) == 1 and "'cpu'" in lines[0], lines


# ------------------------------------------------------------------ GPU lowering
@pytest.mark.parametrize("rows,width,hidden", [(256 * 196, 768, 3072),  # B/16 channel MLP.
                                               (256 * 768, 196, 384)])  # B/16 token MLP.
def test_kernels_lower_to_triton_on_the_b16_shapes(rows, width, hidden):
  # What this CPU can check of the GPU programs: Pallas's Triton lowering accepts every
  # kernel with the default tiles (block shapes, masks, dtypes); compiling them to PTX
  # and running them needs a GPU.
  if tuple(int(p) for p in jaxlib.__version__.split(".")[:3]) > (0, 10, 2):
    pytest.skip("jaxlib > 0.10.2 compiles Triton while lowering, which needs a GPU")
  s, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  args = (s((rows, width), bf16), s((width,), jnp.float32), s((width,), jnp.float32),
          s((width, hidden), bf16), s((hidden,), bf16), s((hidden, width), bf16), s((width,), bf16))

  def forward(x, scale, bias, w1, b1, w2, b2):
    return pallas.mlp(pallas.layer_norm(x, scale, bias, dtype=bf16), w1, b1, w2, b2)

  loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32))
  for f, kernel_count in [(forward, 2), (jax.grad(loss, argnums=tuple(range(7))), 4)]:
    hlo = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"xla\.gpu\.triton|triton_kernel_call", hlo)) == kernel_count
