"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601, Figure 1) in Flax linen.

An image is cut into S non-overlapping P x P patches, each projected to C channels by
the stem; the tokens form a table X of S rows and C columns. Each of the N blocks
mixes the columns (across tokens), then the rows (across channels):

  U = X + (W2 gelu(W1 LayerNorm(X)^T))^T     token mixing, one MLP of width D_S
  Y = U + W4 gelu(W3 LayerNorm(U))           channel mixing, one MLP of width D_C

(biases left out). The head is a LayerNorm, the mean over tokens and a zero-initialised
linear classifier. GELU is the released models' tanh approximation, LayerNorm's
epsilon 1e-6.

The parameter tree is the one of Google's released `.npz` files: `stem`,
`MixerBlock_{i}/{LayerNorm_0, token_mixing/Dense_{0,1}, LayerNorm_1,
channel_mixing/Dense_{0,1}}`, `pre_head_layer_norm`, `head`.

Beyond the paper: stochastic depth and dropout for training, a compute dtype
(parameters stay float32, logits come out float32), per-block rematerialisation
(`remat_policy`), and `scan`: the N blocks run as one block under `nn.scan` (one
traced block instead of N: faster compiles), with every block parameter stacked on a
leading block axis under `MixerBlock` (`blocks.py` converts between that and the
released layout). `dot_general`, `conv_general_dilated` and `activation` are the
plain ops, and `layer_norm` and `mlp_block` the plain modules (nn.LayerNorm, MlpBlock),
unless `models.create_model(..., kernels=...)` injects an equal, faster form from
`mixer_jax/kernels/` (the same parameters).
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mixer_jax.models import blocks


def gelu(x):
  """The released models' GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return nn.gelu(x, approximate=True)


def drop_path(x, rate: float, rng) -> jax.Array:
  """Stochastic depth: zero a residual branch per example, rescale the kept ones.

  Kept branches are divided by the survival probability (1 - rate), as in timm's
  DropPath and big_vision, so evaluation needs no rescaling.
  """
  keep = 1.0 - rate  # A number, or a float32 array under scan: x keeps its dtype.
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense back to the input width, over the last axis."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  dot_general: Callable = lax.dot_general
  activation: Callable = gelu

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=self.dot_general)
    y = self.activation(dense(self.mlp_dim)(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = dense(x.shape[-1])(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class MixerBlock(nn.Module):
  """x += token_mixing(LN(x)^T)^T ; x += channel_mixing(LN(x)), on (batch, tokens, channels).

  `drop_rate`: this block's stochastic-depth rate (a number, or under scan this
  block's entry of the scanned rates); None = no stochastic depth.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  dot_general: Callable = lax.dot_general
  activation: Callable = gelu
  layer_norm: Callable = nn.LayerNorm
  mlp_block: Callable = MlpBlock

  def _residual(self, x, branch, train, drop_rate):
    if train and drop_rate is not None:
      branch = drop_path(branch, drop_rate, self.make_rng("dropout"))
    return x + branch

  # Positional `train`: nn.remat marks it static (argument 2, counting self).
  @nn.compact
  def __call__(self, x, train: bool = False, drop_rate=None):
    mlp = functools.partial(self.mlp_block, dropout=self.dropout, dtype=self.dtype,
                            dot_general=self.dot_general, activation=self.activation)
    y = self.layer_norm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y = jnp.swapaxes(y, 1, 2)
    y = mlp(self.tokens_mlp_dim, name="token_mixing")(y, train=train)
    x = self._residual(x, jnp.swapaxes(y, 1, 2), train, drop_rate)
    y = self.layer_norm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_1")(x)
    y = mlp(self.channels_mlp_dim, name="channel_mixing")(y, train=train)
    return self._residual(x, y, train, drop_rate)


class MlpMixer(nn.Module):
  """The paper's MLP-Mixer. Inputs: NHWC images scaled to [-1, 1].

  Attributes:
    num_classes: head width; 0 or None returns the pooled pre-logits (B, C).
    stoch_depth: drop rate of the LAST block; block i of N uses stoch_depth * i / (N - 1).
    dropout: dropout rate after each GELU and after each MLP's output.
    dtype: compute dtype; parameters are float32 and logits are returned in float32.
    head_bias_init: initial head bias (e.g. -6.9 for a sigmoid loss).
    remat_policy: "none", or recompute each block's activations in the backward pass
      keeping what the policy names ("full": only the block input; blocks.py).
    scan: run the blocks under nn.scan, parameters stacked under `MixerBlock`.

  `apply(..., return_tokens=True)` returns the tokens after `pre_head_layer_norm` (B, S, C).
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
  remat_policy: str = "none"
  scan: bool = False
  dot_general: Callable = lax.dot_general
  conv_general_dilated: Callable = lax.conv_general_dilated
  activation: Callable = gelu
  layer_norm: Callable = nn.LayerNorm
  mlp_block: Callable = MlpBlock
  # Applied to the tokens entering each block: identity here; the trainer pins their
  # batch axis to the devices' data axis (sharding.batch_constraint), which keeps a
  # scanned, fsdp-sharded model data-parallel inside the loop.
  constrain: Callable = lambda x: x

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_tokens: bool = False):
    check_image_shape(images.shape, self.patch_size)
    p = self.patch_size
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                conv_general_dilated=self.conv_general_dilated, name="stem")(images)
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))  # Tokens in row-major raster order.
    # N blocks (one looped N times under scan); block i of N drops its residual
    # branches at stoch_depth * i / (N - 1) in training (blocks.py).
    x = blocks.run_blocks(
        MixerBlock, x, prefix="MixerBlock", num_blocks=self.num_blocks, train=train,
        stoch_depth=self.stoch_depth, scan=self.scan, remat=self.remat_policy,
        constrain=self.constrain, tokens_mlp_dim=self.tokens_mlp_dim,
        channels_mlp_dim=self.channels_mlp_dim, dropout=self.dropout, dtype=self.dtype,
        dot_general=self.dot_general, activation=self.activation,
        layer_norm=self.layer_norm, mlp_block=self.mlp_block)
    x = self.layer_norm(epsilon=1e-6, dtype=self.dtype, name="pre_head_layer_norm")(x)
    if return_tokens:
      return x.astype(jnp.float32)
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, dot_general=self.dot_general,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name="head")(x)
    return x.astype(jnp.float32)


def check_image_shape(shape, patch_size):
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Images must be NHWC with 3 channels, got shape {tuple(shape)}.")
  for side in shape[1:3]:
    if side % patch_size:
      raise ValueError(
          f"Image side {side} is not divisible by the patch size {patch_size}; use an image "
          f"size that is a multiple of {patch_size} (e.g. {patch_size * max(side // patch_size, 1)}).")
