"""MLP-Mixer (arXiv 2105.01601) in Flax linen, parameter tree = released checkpoints.

The module tree is exactly the one of Google's released `.npz` files:
`stem`, `MixerBlock_{i}/{LayerNorm_0, token_mixing/Dense_{0,1}, LayerNorm_1,
channel_mixing/Dense_{0,1}}`, `pre_head_layer_norm`, `head`.

Usage:
  model = create_model("B/16", num_classes=1000)
  params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  logits = model.apply({"params": params}, images, train=False)   # NHWC in [-1, 1]

Features: `create_model(..., num_classes=0)` returns the pooled pre-logits (B, C);
`model.apply(..., return_tokens=True)` returns the token features before pooling
(B, S, C), after `pre_head_layer_norm`.
"""

import dataclasses
import functools
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Paper Table 1: hidden size C, blocks, token-MLP width D_S, channel-MLP width D_C.
SIZES = {
    "S": dict(hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B": dict(hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H": dict(hidden_dim=1280, num_blocks=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}
PAPER_VARIANTS = ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")
# Released models: LayerNorm epsilon 1e-6, GELU in its tanh approximation.
LAYER_NORM_EPSILON = 1e-6


_SQRT_2_OVER_PI = 0.7978845608028654


def _gelu_sigmoid_arg(x):
  """2u, with u = sqrt(2/pi) * (x + 0.044715 x^3), and d(2u)/dx."""
  two_u = 2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))
  return two_u, 2.0 * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * (x * x))


def _gelu_and_derivative(x):
  """gelu(x) and gelu'(x): d/dx [x s(2u)] = s + x s (1 - s) d(2u)/dx, s = sigmoid(2u)."""
  two_u, d_two_u = _gelu_sigmoid_arg(x)
  s = jax.nn.sigmoid(two_u)
  return x * s, s + x * s * (1.0 - s) * d_two_u


@jax.custom_jvp
def gelu(x):
  """GELU in its tanh approximation (the released models'), as x * sigmoid(2u).

  0.5 * x * (1 + tanh(u)) equals x * sigmoid(2u) exactly in real arithmetic, with
  u = sqrt(2/pi) * (x + 0.044715 x^3). Why not `nn.gelu(approximate=True)`: XLA on CPU
  spreads the logistic form over every core and evaluates it about twice as fast as
  tanh (BENCHMARKS.md); in float32 the two differ by rounding only (about 1e-6).

  Why a custom JVP: autodiff of this formula hands the backward pass five arrays of
  the MLP's hidden size (x, sigmoid(2u) and the pieces of its derivative); the rule
  below hands it one, gelu'(x). XLA on GPU recomputes such pieces itself (no speed
  change on an H100); on CPU the train step's temporary memory falls (BENCHMARKS.md).
  Forward-mode autodiff (jvp, jacfwd, hessian) still works.
  """
  two_u, _ = _gelu_sigmoid_arg(x)
  return x * jax.nn.sigmoid(two_u)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y, derivative = _gelu_and_derivative(x)
  return y, derivative * t


def _sum_to_shape(x, shape):
  """Sums x over the axes that `shape` (right-aligned, as in broadcasting) lacks or has as 1."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axes).reshape(shape)


@jax.custom_vjp
def bias_gelu(y, bias):
  """gelu(y + bias), whose backward pass keeps y (the matmul's output) and the bias.

  Why: autodiff would keep gelu'(y + bias), an array the forward pass must write
  besides the activation itself; y already exists. So the forward pass writes one
  array of the MLP's hidden size instead of two, and the backward pass reads y instead
  of the derivative and recomputes it. The hidden layer is the largest activation of
  the model, and on GPUs these element-wise passes are bound by memory bandwidth.
  """
  return gelu(y + bias)


def _bias_gelu_fwd(y, bias):
  return gelu(y + bias), (y, bias)


def _bias_gelu_bwd(residuals, g):
  # The barrier stops XLA from merging this recomputation with the forward pass's
  # (common-subexpression elimination), which would keep its intermediates instead.
  y, bias = lax.optimization_barrier(residuals)
  _, derivative = _gelu_and_derivative(y + bias)
  grad = g * derivative
  return (_sum_to_shape(grad, y.shape).astype(y.dtype),
          _sum_to_shape(grad, bias.shape).astype(bias.dtype))


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


class PatchStem(nn.Conv):
  """The stem conv (kernel = stride = patch, VALID), computed as one patch matmul.

  Same module type, parameters (`kernel` (P, P, 3, C), `bias`) and initialisers as the
  `nn.Conv` it replaces, so checkpoints and init are unchanged. Why: XLA on CPU runs
  this strided conv and its kernel gradient far below matmul speed, while the
  equivalent (B*N, P*P*3) x (P*P*3, C) product runs near it. Equal to the conv up to
  float32 summation order. The product is `Dense`'s (see there for `forward_mode_ad`).
  """
  forward_mode_ad: bool = False

  @nn.compact
  def __call__(self, images):
    p = self.kernel_size[0]
    if (tuple(self.kernel_size) != (p, p) or tuple(self.strides or ()) != (p, p)
        or self.padding != "VALID" or self.feature_group_count != 1):
      raise ValueError("PatchStem only computes a non-overlapping patch embedding.")
    b, h, w, c = images.shape
    kernel = self.param("kernel", self.kernel_init, (p, p, c, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
    # (B, H, W, c) -> (B, H/p, W/p, p, p, c): each row a patch in the kernel's (p, p, c) order.
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // p, w // p, p * p * c)
    product = _product if self.forward_mode_ad else dense_matmul
    return product(patches, kernel.reshape(p * p * c, self.features)) + bias


def _product(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _product_columns(x, kernel):
  return lax.dot_general(kernel, x, (((0,), (0,)), ((), ())))


# Why the products below are hand-ordered: XLA's CPU backend hands a matmul to its fast
# library (YNNPACK) only when the left operand is contracted over its last axis (A @ B
# or A @ B^T of row-major operands). Autodiff's kernel gradients contract it over its
# first axis, which goes to a generic matmul, 1.2-2x slower on this model's shapes
# (BENCHMARKS.md). XLA folds a plain transpose into the matmul's dimension numbers, so
# where a transposed copy is wanted it is fenced with `lax.optimization_barrier`. Other
# backends (cuBLAS, TPU) take transposed operands for free and get the plain products.


def _kernel_grad(x, g):
  """sum over rows of x (R, K) outer g (R, N) -> (K, N): the plain product."""
  return lax.dot_general(x, g, (((0,), (0,)), ((), ())))


def _kernel_grad_cpu(x, g):
  """The same sum as one A @ B: the smaller operand is copied transposed, goes first."""
  if x.size <= g.size:
    return lax.optimization_barrier(x.T) @ g
  return lax.optimization_barrier(lax.optimization_barrier(g.T) @ x).T


@jax.custom_vjp
def dense_matmul(x, kernel):
  """x (..., K) @ kernel (K, N): a Dense layer's product, with a hand-ordered backward.

  Same products and sums as autodiff; the float32 summation order inside the matmul
  may differ.
  """
  return _product(x, kernel)


def _dense_matmul_fwd(x, kernel):
  return _product(x, kernel), (x, kernel)


def _dense_matmul_bwd(residuals, g):
  x, kernel = residuals
  grad_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  rows = lambda a: a.reshape(-1, a.shape[-1])
  grad_kernel = lax.platform_dependent(rows(x), rows(g), cpu=_kernel_grad_cpu,
                                       default=_kernel_grad)
  return grad_x, grad_kernel


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def _product_columns_cpu(x, kernel):
  return lax.optimization_barrier(kernel.T) @ x


def _product_columns_any(x, kernel):
  return lax.platform_dependent(x, kernel, cpu=_product_columns_cpu, default=_product_columns)


@jax.custom_vjp
def dense_matmul_columns(x, kernel):
  """kernel (K, N) applied to every column of x (K, R): kernel^T @ x -> (N, R)."""
  return _product_columns_any(x, kernel)


def _dense_matmul_columns_fwd(x, kernel):
  return _product_columns_any(x, kernel), (x, kernel)


def _dense_matmul_columns_bwd(residuals, g):
  x, kernel = residuals
  grad_x = kernel @ g
  # sum over columns of x (K, R) outer g (N, R): both are contracted over their last
  # axis, a form the fast library takes as it is.
  grad_kernel = lax.dot_general(x, g, (((1,), (1,)), ((), ())))
  return grad_x, grad_kernel


dense_matmul_columns.defvjp(_dense_matmul_columns_fwd, _dense_matmul_columns_bwd)


class Dense(nn.Dense):
  """`nn.Dense` (same name, parameters and initialisers) with hand-ordered matmuls.

  `columns=True` takes inputs (features, rows) instead of (rows..., features) and
  returns (self.features, rows): the same layer applied to every column (token mixing
  lays the batch out that way, see MixerBlock).

  `gelu=True` applies GELU after the bias, through `bias_gelu` (the bias is then
  required).

  A custom VJP has no forward-mode derivative: with `forward_mode_ad=True` the products
  are plain `dot_general`s, so that jax.jvp, jax.jacfwd and jax.hessian work (the
  train step is then slower on CPUs).
  """
  columns: bool = False
  gelu: bool = False
  forward_mode_ad: bool = False

  @nn.compact
  def __call__(self, inputs):
    if self.columns and inputs.ndim != 2:
      raise ValueError(f"Dense(columns=True) takes (features, rows) inputs, got shape "
                       f"{inputs.shape}.")
    in_features = inputs.shape[0] if self.columns else inputs.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if self.columns:
      product = _product_columns if self.forward_mode_ad else dense_matmul_columns
      bias = None if bias is None else bias[:, None]
    else:
      product = _product if self.forward_mode_ad else dense_matmul
    y = product(inputs, kernel)
    if self.gelu:
      if bias is None:
        raise ValueError("Dense(gelu=True) needs use_bias=True.")
      return gelu(y + bias) if self.forward_mode_ad else bias_gelu(y, bias)
    return y if bias is None else y + bias


def _layer_norm_stats(x, epsilon):
  """Per-row mean and 1 / sqrt(var + eps) in float32, as flax's LayerNorm computes them."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x * x, -1, keepdims=True) - mean * mean)
  return mean, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon, dtype):
  """LayerNorm over the last axis: flax's forward, a backward that keeps only x.

  The same float32 arithmetic as `nn.LayerNorm` forward. Why a custom VJP: autodiff of
  it keeps three float32 arrays of x's size for the backward pass (in bfloat16 compute
  that is six times x's own bytes); this rule keeps x and two numbers per row, and
  recomputes the normalised x in the backward pass. XLA on GPU already recomputed
  them (no speed change on an H100); on CPU the B/16 train step's temporary memory fell
  by 8 % with this rule and gelu's (BENCHMARKS.md).
  """
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  mean, rstd = _layer_norm_stats(x, epsilon)
  y = ((x.astype(jnp.float32) - mean) * (rstd * scale) + bias).astype(dtype)
  return y, (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, dtype, residuals, g):
  x, mean, rstd, scale = residuals
  g = g.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  rows = tuple(range(x.ndim - 1))
  grad_scale, grad_bias = jnp.sum(g * x_hat, rows), jnp.sum(g, rows)
  g_hat = g * scale
  # d/dx of (x - mean) * rstd, applied to g_hat: the mean and variance paths subtract
  # g_hat's row mean and its projection on x_hat.
  grad_x = rstd * (g_hat - jnp.mean(g_hat, -1, keepdims=True)
                   - x_hat * jnp.mean(g_hat * x_hat, -1, keepdims=True))
  return grad_x.astype(x.dtype), grad_scale, grad_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.LayerNorm):
  """`nn.LayerNorm` over the last axis (same name, parameters, forward) via `layer_norm`.

  With `forward_mode_ad=True` (see `Dense`), float64 inputs, or any setting but flax's
  defaults besides `epsilon`, `dtype`, `param_dtype` and the initialisers, it is
  flax's own.
  """
  forward_mode_ad: bool = False

  def _flax_defaults(self):
    return (self.use_bias and self.use_scale and self.use_fast_variance
            and self.reduction_axes == -1 and self.feature_axes == -1
            and self.axis_name is None and self.force_float32_reductions)

  @nn.compact
  def __call__(self, x):
    # float64 inputs: flax computes in float64, layer_norm in float32.
    if self.forward_mode_ad or not self._flax_defaults() or jnp.dtype(x.dtype).itemsize > 4:
      return super().__call__(x)
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return layer_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                      float(self.epsilon), jnp.dtype(dtype))


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense back to the input width (`Dense_0`, `Dense_1`).

  `columns=True`: x is (features, rows) and the MLP acts on each column (see Dense).
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  forward_mode_ad: bool = False
  columns: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = x.shape[0] if self.columns else x.shape[-1]
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              columns=self.columns, forward_mode_ad=self.forward_mode_ad)
    y = dense(self.mlp_dim, gelu=True)(x)  # GELU fused with the bias (see bias_gelu).
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = dense(width)(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


def drop_path(x, rate: float, rng) -> jax.Array:
  """Stochastic depth: zero a residual branch per example, rescale the kept ones.

  Kept branches are divided by the survival probability (1 - rate), as in timm's
  DropPath and big_vision, so the expected branch output at training equals the
  deterministic output at evaluation and no rescaling is needed at test time.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MixerBlock(nn.Module):
  """x += token_mixing(LN(x)^T)^T ; x += channel_mixing(LN(x))."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stoch_depth: float = 0.0  # This block's drop rate.
  dropout: float = 0.0
  dtype: Any = jnp.float32
  forward_mode_ad: bool = False

  def _residual(self, x, branch, train):
    if train and self.stoch_depth > 0.0:
      branch = drop_path(branch, self.stoch_depth, self.make_rng("dropout"))
    return x + branch

  @nn.compact
  def __call__(self, x, train: bool = False):
    # x: (batch, tokens, channels). `train` is positional so nn.remat can mark it static.
    # Why batch-major: data parallelism shards the batch axis, and every layer's kernel
    # gradient flattens the rows before it; with the batch leading they stay sharded (a
    # token-major stream made XLA gather the whole batch's activations on every device).
    y = LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                  forward_mode_ad=self.forward_mode_ad)(x)
    # Token mixing acts on the columns of each image's (tokens, channels) table. All of
    # the batch's columns side by side make one (tokens, batch * channels) matrix that
    # the MLP multiplies from the left: moving whole channel rows is a cheaper
    # relayout than transposing each image, and the matmuls get row-major operands.
    b, s, c = y.shape
    y = jnp.transpose(y, (1, 0, 2)).reshape(s, b * c)
    y = MlpBlock(self.tokens_mlp_dim, self.dropout, self.dtype, self.forward_mode_ad,
                 columns=True, name="token_mixing")(y, train=train)
    x = self._residual(x, jnp.transpose(y.reshape(s, b, c), (1, 0, 2)), train)
    y = LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                  forward_mode_ad=self.forward_mode_ad)(x)
    y = MlpBlock(self.channels_mlp_dim, self.dropout, self.dtype, self.forward_mode_ad,
                 name="channel_mixing")(y, train=train)
    return self._residual(x, y, train)


class MlpMixer(nn.Module):
  """The paper's MLP-Mixer. Inputs: NHWC images scaled to [-1, 1].

  Attributes:
    num_classes: head width; 0 or None returns pooled pre-logits instead of logits.
    stoch_depth: stochastic-depth rate of the LAST block; block i of N uses
      `stoch_depth * i / (N - 1)` (0 for the first block), one per-example decision
      per residual branch, kept branches rescaled by 1/(1 - rate) (see `drop_path`).
    dropout: dropout rate after GELU and after each MLP's output.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32 and the
      logits are returned in float32.
    head_bias_init: initial head bias (e.g. -6.9 for a sigmoid loss; kernel is zeros).
    remat: rematerialise each block in the backward pass (saves activation memory).
    forward_mode_ad: plain products in the MLPs, so that forward-mode autodiff
      (jax.jvp, jax.jacfwd, jax.hessian) works; see `Dense`.
  """
  patch_size: int
  num_classes: Optional[int]
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stoch_depth: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  head_bias_init: float = 0.0
  remat: bool = False
  forward_mode_ad: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_tokens: bool = False):
    _check_image_shape(images.shape, self.patch_size)
    x = PatchStem(self.hidden_dim, (self.patch_size, self.patch_size),
                  strides=(self.patch_size, self.patch_size), padding="VALID",
                  dtype=self.dtype, param_dtype=jnp.float32,
                  forward_mode_ad=self.forward_mode_ad, name="stem")(images)
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))  # Row-major raster order.
    # static_argnums counts `self`: argument 2 is `train`.
    block_cls = nn.remat(MixerBlock, static_argnums=(2,)) if self.remat else MixerBlock
    for i in range(self.num_blocks):
      rate = self.stoch_depth * i / max(self.num_blocks - 1, 1)
      x = block_cls(self.tokens_mlp_dim, self.channels_mlp_dim, rate, self.dropout,
                    self.dtype, self.forward_mode_ad, name=f"MixerBlock_{i}")(x, train)
    x = LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                  forward_mode_ad=self.forward_mode_ad, name="pre_head_layer_norm")(x)
    if return_tokens:
      return x.astype(jnp.float32)
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name="head")(x)
    return x.astype(jnp.float32)


def _check_image_shape(shape, patch_size):
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Images must be NHWC with 3 channels, got shape {tuple(shape)}.")
  for side in shape[1:3]:
    if side % patch_size:
      raise ValueError(
          f"Image side {side} is not divisible by the patch size {patch_size}; use an "
          f"image size that is a multiple of {patch_size} (e.g. {patch_size * max(side // patch_size, 1)}).")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int


def parse_variant(variant: str) -> MixerSpec:
  """'B/16' -> MixerSpec. Any '<S|B|L|H>/<patch>' is accepted."""
  m = re.fullmatch(r"([SBLH])/(\d+)", str(variant).strip())
  if not m or int(m.group(2)) <= 0:
    raise ValueError(
        f"Unknown Mixer variant {variant!r}; use '<S|B|L|H>/<patch>' such as "
        f"{', '.join(PAPER_VARIANTS)} or 'B/8'.")
  return MixerSpec(patch_size=int(m.group(2)), **SIZES[m.group(1)])


_SIZE_FIELDS = ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim")
_OTHER_FIELDS = ("stoch_depth", "dropout", "dtype", "head_bias_init", "remat",
                 "forward_mode_ad")


def create_model(variant: str, num_classes: Optional[int], **overrides) -> MlpMixer:
  """Builds a Mixer from a paper variant name plus optional field overrides.

  Args:
    variant: "S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14" or any
      "<S|B|L|H>/<patch>".
    num_classes: head width; 0 or None gives pooled pre-logit features.
    **overrides: any of patch_size, num_blocks, hidden_dim, tokens_mlp_dim,
      channels_mlp_dim (custom/tiny models), stoch_depth, dropout, dtype
      ("float32", "bfloat16" or a jnp dtype), head_bias_init, remat, forward_mode_ad.
  """
  fields = dataclasses.asdict(parse_variant(variant))
  unknown = set(overrides) - set(_SIZE_FIELDS) - set(_OTHER_FIELDS)
  if unknown:
    raise ValueError(f"Unknown model field(s) {sorted(unknown)}; allowed: "
                     f"{', '.join(_SIZE_FIELDS + _OTHER_FIELDS)}.")
  fields.update(overrides)
  for name in _SIZE_FIELDS:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"Model field {name}={value!r} must be a positive integer.")
  if num_classes is not None and (isinstance(num_classes, bool) or
                                  not isinstance(num_classes, int) or num_classes < 0):
    raise ValueError(f"num_classes={num_classes!r} must be a non-negative integer "
                     "(0 or None for pre-logit features).")
  for name in ("stoch_depth", "dropout"):
    value = fields.get(name, 0.0)
    if not 0.0 <= float(value) < 1.0:
      raise ValueError(f"Model field {name}={value!r} must be in [0, 1).")
  if "dtype" in fields:
    fields["dtype"] = compute_dtype(fields["dtype"])
  return MlpMixer(num_classes=num_classes, **fields)


def compute_dtype(name):
  """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
  allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if isinstance(name, str):
    if name not in allowed:
      raise ValueError(f"Unknown compute dtype {name!r}; use one of {', '.join(allowed)}.")
    return allowed[name]
  return name


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def init_params(model: MlpMixer, image_size: int, rng=None):
  """Parameters of `model` for square images of side `image_size`, without FLOPs.

  Uses `jax.eval_shape` first so that a bad shape fails fast, then initialises.
  """
  rng = jax.random.key(0) if rng is None else rng
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda r: model.init(r, dummy, train=False))(rng)["params"]


def param_shapes(model: MlpMixer, image_size: int):
  """Parameter ShapeDtypeStructs, computed without allocating or running anything."""
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)["params"]
