"""EXPERIMENTAL: Pallas GPU kernels for the Mixer's LayerNorms and MLP blocks, each beside
its plain twin. Never measured to pay on the hardware they target (issue 21), so never
chosen by `kernels="auto"`: only by name, `kernels="pallas"`.

Why (BENCHMARKS.md, "GPU"): on an H100 about 25 of the 56 ms of a B/16 bfloat16 train
step are element-wise passes at memory bandwidth, and kernels that XLA generates are
bounded near 47 % MFU. These kernels put the element-wise work into passes that must
read or write the data anyway:

- `layer_norm`: the forward in one pass over each block of rows (statistics and
  output), the backward in one pass (the input gradient, plus per-program partial sums
  of the scale and bias gradients). Plain twin: `layer_norm_plain` (flax's LayerNorm).
- `mlp`: Dense -> tanh GELU -> Dense. Forward: the first product has bias + GELU in its
  epilogue (`dense_gelu`). Backward: the product that carries the gradient back through
  the second Dense has the GELU derivative, and the first bias's gradient sums, in its
  epilogue (`gelu_grad_matmul`), so neither the GELU output's gradient nor a separate
  element-wise pass touches memory. The other products are XLA's. Plain twin: `mlp_plain`.

The model reaches them through `interceptor()`, a flax method interceptor that state.py
installs around `apply` with `kernels="pallas"`: it computes flax's nn.LayerNorm and the
models' `layers.MlpBlock` with these kernels, on the layers' own parameters. Where Pallas cannot compile for a GPU here (no GPU backend, or
Triton failing on this one), and on more than one device (XLA's SPMD partitioner cannot
split a Pallas kernel; that needs shard_map over the batch), the modules run their
plain twins, flax's own layers, and say so once in the log. `Tiles(interpret=True)`
runs the kernels in Pallas's interpreter on any backend instead (how
tests/test_pallas.py checks them on a CPU).

Shapes need not divide the blocks: every load and store is masked. The GPU kernels are
Triton kernels (Pallas's Triton lowering); tile sizes are `Tiles`.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixer_jax.models import layers

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block sizes and launch options; each is clamped to the problem (at least 16 for a
  matmul operand, Triton's smallest dot). Static: part of the compiled program."""
  block_m: int = 128  # Matmul tile rows.
  block_n: int = 128  # Matmul tile columns.
  block_k: int = 64  # Matmul depth step.
  ln_elements: int = 4096  # LayerNorm rows per block: this // the padded row width (>= 1).
  ln_programs: int = 1024  # LayerNorm backward programs, each summing its rows' gradients.
  num_warps: int = 4
  num_stages: int = 3
  interpret: bool = False  # Pallas's interpreter (any backend) instead of Triton.


TILES = Tiles()


def _pow2_at_least(size: int, low: int = 1) -> int:
  return max(low, pl.next_power_of_2(size))


def _call(kernel, tiles: Tiles, **kw):
  return pl.pallas_call(
      kernel, interpret=tiles.interpret,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages), **kw)


def _rows(a):
  return a.reshape(-1, a.shape[-1])


# -------------------------------------------------------------------------- GELU
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x):
  """The model's GELU (models/mixer.py): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_f32(h):
  return 0.5 * h * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h * h * h)))


def _gelu_grad_f32(h):
  """d gelu(h) / dh of the tanh form."""
  t = jnp.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h * h * h))
  return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 0.134145 * h * h)


# --------------------------------------------------------------------- LayerNorm
def layer_norm_plain(x, scale, bias, eps: float = 1e-6, dtype=None):
  """flax's nn.LayerNorm over the last axis: float32 statistics, output in `dtype`."""
  dtype = jnp.result_type(x, scale, bias) if dtype is None else dtype
  xf = x.astype(F32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(xf * xf, axis=-1, keepdims=True) - mean * mean)
  y = (xf - mean) * (lax.rsqrt(var + eps) * scale) + bias
  return y.astype(dtype)


def _ln_forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, rows, cols,
                       eps):
  bm, bc = x_ref.shape
  r = pl.program_id(0) * bm + jnp.arange(bm)
  c = jnp.arange(bc)
  row_ok, col_ok = r < rows, c < cols
  mask = row_ok[:, None] & col_ok[None, :]
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(F32)
  mean = jnp.sum(x, axis=1) / cols
  centred = jnp.where(mask, x - mean[:, None], 0.0)
  rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1) / cols + eps)
  scale = plgpu.load(scale_ref, mask=col_ok, other=0.0).astype(F32)
  bias = plgpu.load(bias_ref, mask=col_ok, other=0.0).astype(F32)
  y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
  plgpu.store(y_ref, y.astype(y_ref.dtype), mask=mask)
  plgpu.store(mean_ref, mean, mask=row_ok)
  plgpu.store(rstd_ref, rstd, mask=row_ok)


def _ln_block(cols: int, tiles: Tiles):
  """(rows per block, padded width) of the LayerNorm kernels."""
  bc = _pow2_at_least(cols)
  return max(1, tiles.ln_elements // bc), bc


def _ln_forward(x, scale, bias, eps, dtype, tiles):
  """x (M, C) -> LayerNorm(x) in `dtype`, and the float32 mean and 1/std of each row."""
  m, c = x.shape
  bm, bc = _ln_block(c, tiles)
  row_block = pl.BlockSpec((bm, bc), lambda i: (i, 0))
  vector = pl.BlockSpec((bc,), lambda i: (0,))
  stat = pl.BlockSpec((bm,), lambda i: (i,))
  return _call(
      functools.partial(_ln_forward_kernel, rows=m, cols=c, eps=eps), tiles,
      grid=(pl.cdiv(m, bm),), in_specs=[row_block, vector, vector],
      out_specs=[row_block, stat, stat],
      out_shape=[jax.ShapeDtypeStruct((m, c), dtype), jax.ShapeDtypeStruct((m,), F32),
                 jax.ShapeDtypeStruct((m,), F32)],
      name="layer_norm_forward")(x, scale, bias)


def _ln_backward_kernel(x_ref, scale_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dscale_ref,
                        dbias_ref, *, rows, cols, bm, steps):
  bc = scale_ref.shape[0]
  c = jnp.arange(bc)
  col_ok = c < cols
  scale = plgpu.load(scale_ref, mask=col_ok, other=0.0).astype(F32)
  first = pl.program_id(0) * steps  # Outside the loop: the interpreter substitutes it there.

  def body(step, sums):
    start = (first + step) * bm
    row_ok = start + jnp.arange(bm) < rows
    mask = row_ok[:, None] & col_ok[None, :]
    block = (pl.ds(start, bm), slice(None))
    x = plgpu.load(x_ref.at[block], mask=mask, other=0.0).astype(F32)
    dy = plgpu.load(dy_ref.at[block], mask=mask, other=0.0).astype(F32)
    mean = plgpu.load(mean_ref.at[pl.ds(start, bm)], mask=row_ok, other=0.0)
    rstd = plgpu.load(rstd_ref.at[pl.ds(start, bm)], mask=row_ok, other=0.0)
    xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dxhat = dy * scale[None, :]
    c1 = jnp.sum(xhat * dxhat, axis=1) / cols
    c2 = jnp.sum(dxhat, axis=1) / cols
    dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    plgpu.store(dx_ref.at[block], dx.astype(dx_ref.dtype), mask=mask)
    dscale, dbias = sums
    return dscale + jnp.sum(dy * xhat, axis=0), dbias + jnp.sum(dy, axis=0)

  zeros = jnp.zeros((bc,), F32)
  dscale, dbias = lax.fori_loop(0, steps, body, (zeros, zeros))
  plgpu.store(dscale_ref, dscale, mask=col_ok)
  plgpu.store(dbias_ref, dbias, mask=col_ok)


def _ln_backward(x, scale, dy, mean, rstd, tiles):
  """dx (M, C) and the (programs, C) float32 partial sums of dscale and dbias."""
  m, c = x.shape
  bm, bc = _ln_block(c, tiles)
  blocks = pl.cdiv(m, bm)
  programs = min(blocks, tiles.ln_programs)
  steps = pl.cdiv(blocks, programs)
  padded = programs * steps * bm  # Each program walks `steps` blocks of the whole array.
  whole = pl.BlockSpec((padded, bc), lambda g: (0, 0))
  stat = pl.BlockSpec((padded,), lambda g: (0,))
  partial = pl.BlockSpec((None, bc), lambda g: (g, 0))
  return _call(
      functools.partial(_ln_backward_kernel, rows=m, cols=c, bm=bm, steps=steps), tiles,
      grid=(programs,),
      in_specs=[whole, pl.BlockSpec((bc,), lambda g: (0,)), whole, stat, stat],
      out_specs=[whole, partial, partial],
      out_shape=[jax.ShapeDtypeStruct((m, c), x.dtype),
                 jax.ShapeDtypeStruct((programs, c), F32),
                 jax.ShapeDtypeStruct((programs, c), F32)],
      name="layer_norm_backward")(x, scale, dy, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm(x, scale, bias, eps, dtype, tiles):
  return _layer_norm_fwd(x, scale, bias, eps, dtype, tiles)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype, tiles):
  y, mean, rstd = _ln_forward(_rows(x), scale, bias, eps, dtype, tiles)
  return y.reshape(x.shape), (x, scale, bias, mean, rstd)


def _layer_norm_bwd(eps, dtype, tiles, residuals, dy):
  x, scale, bias, mean, rstd = residuals
  dx, dscale, dbias = _ln_backward(_rows(x), scale, _rows(dy), mean, rstd, tiles)
  return (dx.reshape(x.shape), dscale.sum(0).astype(scale.dtype),
          dbias.sum(0).astype(bias.dtype))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x, scale, bias, *, eps: float = 1e-6, dtype=None, tiles: Tiles = TILES):
  """`layer_norm_plain` over the last axis of x (..., C), forward and backward in Pallas.

  Statistics in float32 (as two passes over the row held on chip, where flax uses
  E[x^2] - E[x]^2: equal up to rounding). A custom VJP: reverse mode only.
  """
  dtype = jnp.dtype(jnp.result_type(x, scale, bias) if dtype is None else dtype)
  return _layer_norm(x, scale, bias, float(eps), dtype, tiles)


# ------------------------------------------------------------------------ matmuls
def _matmul_tile(a_ref, b_ref, row_ok, col_ok, depth: int, bk: int):
  """float32 (rows, cols) tile of a @ b: a_ref (bm, >= depth), b_ref (>= depth, bn)."""
  def body(i, acc):
    k_ok = i * bk + jnp.arange(bk) < depth
    a = plgpu.load(a_ref.at[:, pl.ds(i * bk, bk)], mask=row_ok[:, None] & k_ok[None, :],
                   other=0.0)
    b = plgpu.load(b_ref.at[pl.ds(i * bk, bk), :], mask=k_ok[:, None] & col_ok[None, :],
                   other=0.0)
    return acc + jnp.dot(a, b, preferred_element_type=F32)

  acc = jnp.zeros((row_ok.shape[0], col_ok.shape[0]), F32)
  return lax.fori_loop(0, pl.cdiv(depth, bk), body, acc)


def _tile_masks(rows, cols, bm, bn):
  row_ok = pl.program_id(0) * bm + jnp.arange(bm) < rows
  col_ok = pl.program_id(1) * bn + jnp.arange(bn) < cols
  return row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def _matmul_specs(m, k, n, tiles):
  """Grid and block specs of an (M, K) @ (K, N) product with an (M, N) epilogue."""
  bm = min(tiles.block_m, _pow2_at_least(m, 16))
  bn = min(tiles.block_n, _pow2_at_least(n, 16))
  bk = min(tiles.block_k, _pow2_at_least(k, 16))
  kp = pl.cdiv(k, bk) * bk  # The depth, padded to whole steps (loads beyond k are masked).
  return dict(
      bm=bm, bn=bn, bk=bk, grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
      lhs=pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
      rhs=pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
      tile=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      vector=pl.BlockSpec((bn,), lambda i, j: (j,)),
      partial=pl.BlockSpec((None, bn), lambda i, j: (i, j)))


def dense_gelu_plain(x, kernel, bias):
  """gelu(x @ kernel + bias) as nn.Dense and the model's GELU compute it."""
  return gelu(_dense(x, kernel, bias))


def _dense_gelu_kernel(x_ref, w_ref, b_ref, y_ref, *h_ref, rows, cols, depth, bk):
  bm, bn = y_ref.shape
  row_ok, col_ok, mask = _tile_masks(rows, cols, bm, bn)
  h = _matmul_tile(x_ref, w_ref, row_ok, col_ok, depth, bk)
  h = h + plgpu.load(b_ref, mask=col_ok, other=0.0).astype(F32)[None, :]
  plgpu.store(y_ref, _gelu_f32(h).astype(y_ref.dtype), mask=mask)
  if h_ref:  # The pre-activation, for the backward pass.
    plgpu.store(h_ref[0], h.astype(h_ref[0].dtype), mask=mask)


def dense_gelu(x, kernel, bias, *, tiles: Tiles = TILES, with_preactivation: bool = False):
  """`dense_gelu_plain` of x (M, K), kernel (K, N), bias (N,): bias + GELU in the product's
  epilogue (float32 accumulator, one rounding to x's dtype). `with_preactivation`: also
  x @ kernel + bias, as a second output."""
  (m, k), n = x.shape, kernel.shape[1]
  s = _matmul_specs(m, k, n, tiles)
  out = jax.ShapeDtypeStruct((m, n), x.dtype)
  outs = 2 if with_preactivation else 1
  result = _call(
      functools.partial(_dense_gelu_kernel, rows=m, cols=n, depth=k, bk=s["bk"]), tiles,
      grid=s["grid"], in_specs=[s["lhs"], s["rhs"], s["vector"]],
      out_specs=[s["tile"]] * outs, out_shape=[out] * outs, name="dense_gelu")(x, kernel, bias)
  return tuple(result) if with_preactivation else result[0]


def gelu_grad_matmul_plain(g, kernel_t, h):
  """(g @ kernel_t) * gelu'(h) and its column sums: the gradient of the first Dense's
  pre-activation h and of its bias, from g, the gradient of the second Dense's output."""
  dh = jax.vjp(gelu, h)[1](lax.dot_general(g, kernel_t, (((1,), (0,)), ((), ()))))[0]
  return dh, jnp.sum(dh.astype(F32), axis=0)


def _gelu_grad_kernel(g_ref, w_ref, h_ref, dh_ref, db_ref, *, rows, cols, depth, bk):
  bm, bn = dh_ref.shape
  row_ok, col_ok, mask = _tile_masks(rows, cols, bm, bn)
  dy = _matmul_tile(g_ref, w_ref, row_ok, col_ok, depth, bk)
  h = plgpu.load(h_ref, mask=mask, other=0.0).astype(F32)
  dh = jnp.where(mask, dy * _gelu_grad_f32(h), 0.0)
  plgpu.store(dh_ref, dh.astype(dh_ref.dtype), mask=mask)
  plgpu.store(db_ref, jnp.sum(dh, axis=0), mask=col_ok)


def gelu_grad_matmul(g, kernel_t, h, *, tiles: Tiles = TILES):
  """`gelu_grad_matmul_plain` of g (M, K), kernel_t (K, N), h (M, N): the GELU derivative
  in the product's epilogue; the bias gradient as float32 column sums per block of rows."""
  (m, k), n = g.shape, kernel_t.shape[1]
  s = _matmul_specs(m, k, n, tiles)
  dh, db = _call(
      functools.partial(_gelu_grad_kernel, rows=m, cols=n, depth=k, bk=s["bk"]), tiles,
      grid=s["grid"], in_specs=[s["lhs"], s["rhs"], s["tile"]],
      out_specs=[s["tile"], s["partial"]],
      out_shape=[jax.ShapeDtypeStruct((m, n), h.dtype),
                 jax.ShapeDtypeStruct((s["grid"][0], n), F32)],
      name="gelu_grad_matmul")(g, kernel_t, h)
  return dh, db.sum(0)


# ---------------------------------------------------------------------- the MLP
def _dense(x, kernel, bias):
  """nn.Dense's product and bias, in the operands' dtype."""
  y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y + bias


def mlp_plain(x, w1, b1, w2, b2):
  """The model's MlpBlock without dropout: Dense -> GELU -> Dense over the last axis."""
  return _dense(gelu(_dense(x, w1, b1)), w2, b2)


def _contract_rows(a, b):
  """a (M, P)^T b (M, Q) -> (P, Q)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mlp(x, w1, b1, w2, b2, tiles):
  y = dense_gelu(_rows(x), w1, b1, tiles=tiles)
  return _dense(y, w2, b2).reshape(x.shape[:-1] + (w2.shape[1],))


def _mlp_fwd(x, w1, b1, w2, b2, tiles):
  y, h = dense_gelu(_rows(x), w1, b1, tiles=tiles, with_preactivation=True)
  out = _dense(y, w2, b2).reshape(x.shape[:-1] + (w2.shape[1],))
  return out, (x, w1, w2, h, y)


def _mlp_bwd(tiles, residuals, g):
  x, w1, w2, h, y = residuals
  g = _rows(g)
  dh, db1 = gelu_grad_matmul(g, w2.T, h, tiles=tiles)
  dx = lax.dot_general(dh, w1, (((1,), (1,)), ((), ())))
  return (dx.reshape(x.shape), _contract_rows(_rows(x), dh), db1.astype(w1.dtype),
          _contract_rows(y, g), jnp.sum(g.astype(F32), axis=0).astype(w2.dtype))


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def mlp(x, w1, b1, w2, b2, *, tiles: Tiles = TILES):
  """`mlp_plain` of x (..., K) with w1 (K, N), w2 (N, K'), all in one dtype: the first
  product with bias + GELU in its epilogue; in the backward pass, the GELU derivative and
  the first bias's gradient in the epilogue of the product that brings the gradient back
  through the second Dense. A custom VJP: reverse mode only."""
  dtypes = {jnp.dtype(a.dtype) for a in (x, w1, b1, w2, b2)}
  if len(dtypes) != 1:
    raise ValueError(f"mlp takes operands of one dtype, got {sorted(map(str, dtypes))}.")
  return _mlp(x, w1, b1, w2, b2, tiles)


# ------------------------------------------------ where the GPU kernels can run
def _probe(tiles: Tiles):
  """Compiles both kernels' forward and backward on tiny shapes for the default device."""
  x = jax.ShapeDtypeStruct((48, 40), jnp.bfloat16)
  vec = lambda n: jax.ShapeDtypeStruct((n,), jnp.bfloat16)
  mat = lambda a, b: jax.ShapeDtypeStruct((a, b), jnp.bfloat16)

  def loss(x, scale, bias, w1, b1, w2, b2):
    y = layer_norm(x, scale, bias, tiles=tiles)
    return jnp.sum(mlp(y, w1, b1, w2, b2, tiles=tiles).astype(F32))

  args = (x, vec(40), vec(40), mat(40, 72), vec(72), mat(72, 40), vec(40))
  jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(*args).compile()


@functools.cache
def _gpu_available(backend: str, devices: int) -> bool:
  if backend != "gpu":
    logging.warning("kernels='pallas': Pallas's GPU kernels need a GPU backend, this one is "
                    "%r; running the plain ops (flax's LayerNorm and Dense).", backend)
    return False
  if devices > 1:  # XLA cannot split a Pallas kernel over a mesh: it would gather operands.
    logging.warning("kernels='pallas': the kernels run on one device for now, this run has "
                    "%d; running the plain ops (flax's LayerNorm and Dense).", devices)
    return False
  try:
    _probe(TILES)
  except Exception as e:  # pylint: disable=broad-except  # Any failure means: plain ops.
    reason = (str(e).strip().splitlines() or [""])[0][:300]
    logging.warning("kernels='pallas': Pallas's GPU kernels do not compile here (%s: %s); "
                    "running the plain ops (flax's LayerNorm and Dense).",
                    type(e).__name__, reason)
    return False
  return True


def gpu_available() -> bool:
  """Whether the Pallas kernels compile for the default backend, on a single device
  (checked once; a False is logged once, with the reason)."""
  return _gpu_available(jax.default_backend(), jax.device_count())


def _use_kernels(tiles: Tiles) -> bool:
  return tiles.interpret or gpu_available()


# ------------------------------------------------------------- the interceptor
def _layer_norm_call(m: nn.LayerNorm, x, tiles: Tiles):
  """`m(x)` for a flax nn.LayerNorm over the last axis, by `layer_norm`; None where this
  form does not cover `m` (axes other than the last, no scale or bias, a named axis,
  rows wider than 16384) or the kernels do not compile here."""
  covered = (m.axis_name is None and m.use_bias and m.use_scale
             and m.reduction_axes in (-1, (-1,)) and m.feature_axes in (-1, (-1,))
             and m.force_float32_reductions and x.shape[-1] <= 16384)
  if not (covered and _use_kernels(tiles)):
    return None
  features = (x.shape[-1],)
  scale = m.param("scale", m.scale_init, features, m.param_dtype)
  bias = m.param("bias", m.bias_init, features, m.param_dtype)
  return layer_norm(x, scale, bias, eps=m.epsilon, dtype=m.dtype, tiles=tiles)


class _DenseParams(nn.Dense):
  """nn.Dense's parameters (names, shapes, initialisers), without its product."""

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return kernel, bias


def _mlp_block_call(m, x, train: bool, tiles: Tiles):
  """`m(x)` for a `layers.MlpBlock` by `mlp` (Dense_0, Dense_1 as the block names them);
  None where it has dropout to apply, uses the exact GELU, or the kernels do not compile."""
  if not m.approximate_gelu or (train and m.dropout > 0.0) or not _use_kernels(tiles):
    return None
  w1, b1 = _DenseParams(m.mlp_dim, name="Dense_0")(x.shape[-1])
  w2, b2 = _DenseParams(x.shape[-1], name="Dense_1")(m.mlp_dim)
  x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2, dtype=m.dtype)
  return mlp(x, w1, b1, w2, b2, tiles=tiles)


def interceptor(tiles: Tiles = TILES):
  """A flax method interceptor computing nn.LayerNorm and `layers.MlpBlock` with these
  kernels (`tiles`: block sizes, or interpret mode); every other call, and what the
  kernels do not cover, as it is."""
  def intercept(next_fun, args, kwargs, context):
    m, out = context.module, None
    if context.method_name == "__call__" and args:
      if type(m) is nn.LayerNorm and not kwargs.get("mask"):
        out = _layer_norm_call(m, args[0], tiles)
      elif type(m) is layers.MlpBlock:
        out = _mlp_block_call(m, args[0], kwargs.get("train", False), tiles)
    return next_fun(*args, **kwargs) if out is None else out

  return intercept
