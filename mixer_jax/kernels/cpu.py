"""Forms of the model's ops that XLA's CPU backend runs faster, each equal to a plain op.

`intercept` (a flax method interceptor, installed around `apply` by state.py when
`kernels` is "cpu", or "auto" on the CPU backend) computes flax's `nn.Dense` and the
patch-embedding `nn.Conv` with these forms, on the layers' own parameters, so the model
files stay the papers. What each form buys on the 2-core CPU (S/32, batch 32,
float32): BENCHMARKS.md, "Kernels A/B" (GELU as x * sigmoid(2u) measured within noise
there, so the model's own tanh GELU runs on every backend).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# ------------------------------------------------------------------------ matmul
# Plain twin: lax.dot_general as nn.Dense calls it, x (..., K) @ kernel (K, N).
#
# Why: XLA's CPU backend hands a matmul to its fast library (YNNPACK) only when the left
# operand is contracted over its last axis (A @ B or A @ B^T of row-major operands).
# Autodiff's kernel gradient, x^T g, contracts x over its first (row) axis, which runs
# in a generic matmul 1.2-2x slower on this model's shapes. XLA folds a plain transpose
# into the matmul's dimension numbers, so the transposed copy that makes the product
# A @ B is fenced with `lax.optimization_barrier` (XLA's CPU pipeline removes barriers
# before fusion, so this is all they do here).


def _rows(a):
  return a.reshape(-1, a.shape[-1])


def kernel_grad(x, g):
  """sum over rows of x (R, K) outer g (R, N) -> (K, N), as one A @ B product.

  The smaller operand is copied transposed and goes first; for g, the small (N, K)
  result is transposed back.
  """
  if x.size <= g.size:
    return lax.optimization_barrier(x.T) @ g
  return lax.optimization_barrier(lax.optimization_barrier(g.T) @ x).T


def _dense_product(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def dense_matmul(x, kernel):
  """x (..., K) @ kernel (K, N) with the kernel gradient as one A @ B product.

  Same products and sums as autodiff; the float32 summation order may differ. A custom
  VJP has no forward mode: jax.jvp of a model with these kernels fails (kernels="xla").
  """
  return _dense_product(x, kernel)


def _dense_matmul_fwd(x, kernel):
  return _dense_product(x, kernel), (x, kernel)


def _dense_matmul_bwd(residuals, g):
  x, kernel = residuals
  grad_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))  # A @ B^T.
  return grad_x, kernel_grad(_rows(x), _rows(g)).astype(kernel.dtype)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general; a Dense layer's product goes through `dense_matmul`."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch and precision is None
      and preferred_element_type is None and lhs.dtype == rhs.dtype):
    return dense_matmul(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


# -------------------------------------------------------------------------- stem
# Plain twin: lax.conv_general_dilated, as nn.Conv calls it.
#
# Why: the stem is a convolution with kernel = stride = patch size. XLA's CPU backend
# runs that strided conv and its kernel gradient far below matmul speed, while the equal
# (B*N, P*P*3) x (P*P*3, C) patch product runs near it.


def _is_patch_embedding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count):
  if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype:
    return False
  p, q = rhs.shape[:2]
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  valid = padding == "VALID" or (not isinstance(padding, str)
                                 and all(tuple(pad) == (0, 0) for pad in padding))
  return (tuple(window_strides) == (p, q) and valid
          and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
          and feature_group_count == 1 and batch_group_count == 1
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
          and lhs.shape[1] % p == 0 and lhs.shape[2] % q == 0 and lhs.shape[3] == rhs.shape[2])


def patch_embedding(images, kernel):
  """conv(images (B, H, W, c), kernel (P, Q, c, C)), stride (P, Q), VALID, as one matmul."""
  b, h, w, c = images.shape
  p, q = kernel.shape[:2]
  # (B, H, W, c) -> (B, H/P, W/Q, P*Q*c): each row one patch, in the kernel's (P, Q, c) order.
  patches = images.reshape(b, h // p, p, w // q, q, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, h // p, w // q, p * q * c)
  return dense_matmul(patches, kernel.reshape(p * q * c, kernel.shape[-1]))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """lax.conv_general_dilated; a non-overlapping patch embedding is `patch_embedding`."""
  if (precision is None and preferred_element_type is None and _is_patch_embedding(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count)):
    return patch_embedding(lhs, rhs)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


# ------------------------------------------------------------- the interceptor
def _plain_product(m) -> bool:
  return m.dot_general is None and m.dot_general_cls is None and m.precision is None


def dense(m: nn.Dense, x):
  """`m(x)` for a flax nn.Dense `m` (its parameters, dtype rules), product by `dot_general`."""
  kernel = m.param("kernel", m.kernel_init, (jnp.shape(x)[-1], m.features), m.param_dtype)
  bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  x, kernel, bias = m.promote_dtype(x, kernel, bias, dtype=m.dtype)
  y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _is_stem(m: nn.Conv, x) -> bool:
  size = tuple(m.kernel_size)
  return (type(m) is nn.Conv and x.ndim == 4 and len(size) == 2
          and tuple(m.strides or (1, 1)) == size and m.padding == "VALID"
          and m.input_dilation in (None, 1) and m.kernel_dilation in (None, 1)
          and m.feature_group_count == 1 and m.mask is None and m.conv_general_dilated is None
          and m.conv_general_dilated_cls is None and m.precision is None
          and x.shape[1] % size[0] == 0 and x.shape[2] % size[1] == 0)


def conv(m: nn.Conv, x):
  """`m(x)` for a patch-embedding flax nn.Conv `m` (kernel = stride, VALID), as one matmul."""
  kernel = m.param("kernel", m.kernel_init, tuple(m.kernel_size) + (x.shape[-1], m.features),
                   m.param_dtype)
  bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  x, kernel, bias = m.promote_dtype(x, kernel, bias, dtype=m.dtype)
  y = patch_embedding(x, kernel)
  return y if bias is None else y + bias


def intercept(next_fun, args, kwargs, context):
  """A flax method interceptor: nn.Dense by `dense`, a patch-embedding nn.Conv by `conv`,
  every other call as it is."""
  m = context.module
  if context.method_name == "__call__" and len(args) == 1 and not kwargs:
    if type(m) is nn.Dense and _plain_product(m):
      return dense(m, args[0])
    if isinstance(m, nn.Conv) and _is_stem(m, args[0]):
      return conv(m, args[0])
  return next_fun(*args, **kwargs)
