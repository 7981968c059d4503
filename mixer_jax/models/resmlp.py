"""ResMLP (Touvron et al. 2021, arXiv 2105.03404, Section 2 and Figure 1) in Flax linen.

An image is cut into N non-overlapping P x P patches, each projected to d channels by
a linear layer (the stem); the patches form a table X of N rows and d columns. Each
of the L residual blocks has two sublayers, a linear one across the patches and a
feedforward one across the channels:

  Z = X + diag(ls1) (A Aff(X)^T)^T          A: one N x N linear layer (no hidden layer)
  Y = Z + diag(ls2) C gelu(B Aff(Z))        B, C: a channel MLP of width 4d

(biases left out). Aff(x) = alpha * x + beta, per channel (alpha 1, beta 0 at first),
replaces LayerNorm: it has no statistics, so at inference it folds into the adjacent
linear layers. diag(ls) is LayerScale, the paper's second Aff after each branch with
its scale only (as in the released code): a learnt per-channel scale that starts
small, so each block starts near the identity (timm's values, used here: 1e-4 for 12
blocks, 1e-5 for 24, 1e-6 for 36 and for the big 24; the official code starts the
12-block model at 0.1).
After the blocks: Aff, the mean over patches and a zero-initialised linear classifier.
GELU is exact (erf), as the released weights were trained with (`approximate_gelu`
switches to the tanh form).

The parameter tree: `stem`, `ResMlpBlock_{i}/{Affine_0, token_mixing, LayerScale_0,
Affine_1, channel_mixing/Dense_{0,1}, LayerScale_1}`, `pre_head_affine`, `head`
(timm's names: timm_layout.py).

Beyond the paper, as for the Mixer (mixer.py): stochastic depth and dropout for
training, a compute dtype (parameters stay float32, logits come out float32),
per-block rematerialisation (`remat_policy`), and `scan` (the blocks under nn.scan,
every block parameter stacked under `ResMlpBlock`; blocks.py converts).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mixer_jax.models import blocks, layers
from mixer_jax.models.layers import MlpBlock


class Affine(nn.Module):
  """Aff(x) = alpha * x + beta over the last axis: a normalisation without statistics."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    x, alpha, beta = nn.dtypes.promote_dtype(x, alpha, beta, dtype=self.dtype)
    return alpha * x + beta


class LayerScale(nn.Module):
  """x * ls over the last axis, ls a learnt per-channel scale starting at `init_value`."""
  init_value: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    x, scale = nn.dtypes.promote_dtype(x, scale, dtype=self.dtype)
    return x * scale


class ResMlpBlock(nn.Module):
  """x += ls1 * token_mixing(Aff(x)^T)^T ; x += ls2 * channel_mixing(Aff(x)), on
  (batch, patches, channels). `drop_rate`: this block's stochastic-depth rate (None:
  none)."""
  channels_mlp_dim: int
  layerscale_init: float
  dropout: float = 0.0
  dtype: Any = jnp.float32
  approximate_gelu: bool = False

  # Positional `train`: nn.remat marks it static (argument 2, counting self).
  @nn.compact
  def __call__(self, x, train: bool = False, drop_rate=None):
    scale = functools.partial(LayerScale, self.layerscale_init, dtype=self.dtype)
    # Linear sublayer: one N x N layer mixing the patches, per channel.
    y = jnp.swapaxes(Affine(self.dtype, name="Affine_0")(x), 1, 2)
    y = nn.Dense(x.shape[1], dtype=self.dtype, name="token_mixing")(y)
    x = layers.residual(self, x, scale(name="LayerScale_0")(jnp.swapaxes(y, 1, 2)), train,
                        drop_rate)
    # Feedforward sublayer: the channel MLP of width channels_mlp_dim, per patch.
    y = Affine(self.dtype, name="Affine_1")(x)
    y = layers.inherit(self, MlpBlock, mlp_dim=self.channels_mlp_dim,
                       name="channel_mixing")(y, train=train)
    return layers.residual(self, x, scale(name="LayerScale_1")(y), train, drop_rate)


class ResMLP(nn.Module):
  """The paper's ResMLP. Inputs: NHWC images scaled to [-1, 1].

  Attributes:
    num_classes: head width; 0 or None returns the pooled pre-logits (B, d).
    channels_mlp_dim: the channel MLP's width (4d in the paper).
    layerscale_init: LayerScale's initial value.
    approximate_gelu: tanh GELU instead of the exact (erf) one of the released weights.
    stoch_depth, dropout, dtype, head_bias_init, remat_policy, scan: as for MlpMixer;
      under scan the parameters are stacked under `ResMlpBlock`.

  `apply(..., return_tokens=True)` returns the patches after `pre_head_affine` (B, N, d).
  """
  patch_size: int
  num_classes: Optional[int]
  num_blocks: int
  hidden_dim: int
  channels_mlp_dim: int
  layerscale_init: float = 1e-4
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
    x = blocks.run_blocks(self, ResMlpBlock, x, train=train)
    x = Affine(self.dtype, name="pre_head_affine")(x)
    if return_tokens:
      return x.astype(jnp.float32)
    return layers.head(x, self.num_classes, self.dtype, self.head_bias_init)
