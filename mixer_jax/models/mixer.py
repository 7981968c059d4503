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
released layout). The model hands its fields to the blocks, and a block to its MLPs,
by name (`layers.inherit`).
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mixer_jax.models import blocks, layers
from mixer_jax.models.layers import MlpBlock


class MixerBlock(nn.Module):
  """x += token_mixing(LN(x)^T)^T ; x += channel_mixing(LN(x)), on (batch, tokens, channels).

  `drop_rate`: this block's stochastic-depth rate (a number, or under scan this
  block's entry of the scanned rates); None = no stochastic depth.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  # Positional `train`: nn.remat marks it static (argument 2, counting self).
  @nn.compact
  def __call__(self, x, train: bool = False, drop_rate=None):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y = jnp.swapaxes(y, 1, 2)
    y = layers.inherit(self, MlpBlock, mlp_dim=self.tokens_mlp_dim, name="token_mixing")(
        y, train=train)
    x = layers.residual(self, x, jnp.swapaxes(y, 1, 2), train, drop_rate)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_1")(x)
    y = layers.inherit(self, MlpBlock, mlp_dim=self.channels_mlp_dim, name="channel_mixing")(
        y, train=train)
    return layers.residual(self, x, y, train, drop_rate)


class MlpMixer(nn.Module):
  """The paper's MLP-Mixer. Inputs: NHWC images scaled to [-1, 1].

  Attributes:
    patch_size, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim: P, N, C,
      D_S and D_C of the paper's Table 1.
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

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_tokens: bool = False):
    x = layers.stem(images, self.patch_size, self.hidden_dim, self.dtype)
    # N blocks (one looped N times under scan); block i of N drops its residual
    # branches at stoch_depth * i / (N - 1) in training (blocks.py).
    x = blocks.run_blocks(self, MixerBlock, x, train=train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="pre_head_layer_norm")(x)
    if return_tokens:
      return x.astype(jnp.float32)
    return layers.head(x, self.num_classes, self.dtype, self.head_bias_init)
