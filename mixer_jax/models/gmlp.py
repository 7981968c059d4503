"""gMLP (Liu et al. 2021, "Pay Attention to MLPs", arXiv 2105.08050, Section 2 and
Figure 1) for images, in Flax linen.

An image is cut into n non-overlapping P x P patches, each projected to d channels by
the stem; the patches form a table X of n rows and d columns. Each of the L blocks is

  Z = gelu(LayerNorm(X) U)                 channel projection up to e channels (6d)
  s(Z) = Z1 * (W LayerNorm(Z2) + b)        spatial gating unit: Z split in two halves
                                           along the channels; W is n x n, across the
                                           patches, initialised near zero with b = 1
  Y = X + s(Z) V                           channel projection back to d channels

so each block starts as a plain channel MLP (s(Z) = Z1) and learns its spatial
interactions. After the blocks: LayerNorm, the mean over patches and a
zero-initialised linear classifier. LayerNorm epsilon 1e-6, in the gate 1e-5; GELU
exact (erf), as the released weights were trained with (`approximate_gelu` switches
to the tanh form). These are timm's definitions (timm's gmlp_s16 weights).

The parameter tree: `stem`, `GMlpBlock_{i}/{LayerNorm_0, channel_proj_in,
spatial_gating/{LayerNorm_0, spatial_proj}, channel_proj_out}`,
`pre_head_layer_norm`, `head` (timm's names: timm_layout.py).

Beyond the paper, as for the Mixer (mixer.py): stochastic depth and dropout (after the
GELU and after the block's output projection), a compute dtype (parameters stay
float32, logits come out float32), per-block rematerialisation (`remat_policy`), and
`scan` (the blocks under nn.scan, every block parameter stacked under `GMlpBlock`;
blocks.py converts).
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mixer_jax.models import blocks, layers


class SpatialGatingUnit(nn.Module):
  """s(Z) = Z1 * (W LayerNorm(Z2) + b), W mixing the patches; Z: (batch, patches, e)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    z1, z2 = jnp.split(z, 2, axis=-1)
    z2 = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="LayerNorm_0")(z2)
    # W near zero and b = 1: the gate starts open, s(Z) ~ Z1 (paper Section 2).
    gate = nn.Dense(z.shape[1], dtype=self.dtype, kernel_init=nn.initializers.normal(1e-6),
                    bias_init=nn.initializers.ones, name="spatial_proj")(jnp.swapaxes(z2, 1, 2))
    return z1 * jnp.swapaxes(gate, 1, 2)


class GMlpBlock(nn.Module):
  """x += channel_proj_out(s(gelu(channel_proj_in(LN(x))))), on (batch, patches,
  channels). `drop_rate`: this block's stochastic-depth rate (None: none)."""
  channels_mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  approximate_gelu: bool = False

  # Positional `train`: nn.remat marks it static (argument 2, counting self).
  @nn.compact
  def __call__(self, x, train: bool = False, drop_rate=None):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.Dense(self.channels_mlp_dim, dtype=self.dtype, name="channel_proj_in")(y)
    y = nn.gelu(y, approximate=self.approximate_gelu)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = SpatialGatingUnit(self.dtype, name="spatial_gating")(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="channel_proj_out")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return layers.residual(self, x, y, train, drop_rate)


class GMLP(nn.Module):
  """The paper's gMLP for images. Inputs: NHWC images scaled to [-1, 1].

  Attributes:
    num_classes: head width; 0 or None returns the pooled pre-logits (B, d).
    channels_mlp_dim: e, the width of channel_proj_in (6d in the paper); even, as the
      gate splits it in two halves (channel_proj_out maps e/2 back to d).
    approximate_gelu: tanh GELU instead of the exact (erf) one of the released weights.
    stoch_depth, dropout, dtype, head_bias_init, remat_policy, scan: as for MlpMixer;
      under scan the parameters are stacked under `GMlpBlock`.

  `apply(..., return_tokens=True)` returns the patches after `pre_head_layer_norm`.
  """
  patch_size: int
  num_classes: Optional[int]
  num_blocks: int
  hidden_dim: int
  channels_mlp_dim: int
  approximate_gelu: bool = False
  stoch_depth: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  head_bias_init: float = 0.0
  remat_policy: str = "none"
  scan: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_tokens: bool = False):
    x = layers.stem(images, self.patch_size, self.hidden_dim, self.dtype)
    x = blocks.run_blocks(self, GMlpBlock, x, train=train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="pre_head_layer_norm")(x)
    if return_tokens:
      return x.astype(jnp.float32)
    return layers.head(x, self.num_classes, self.dtype, self.head_bias_init)
