"""What the three families share: the patch stem, GELU, the MLP, the residual with
stochastic depth, the pooled head, and `inherit`.

A module passes its hyperparameters down by name (`inherit`): a submodule's field that
its parent also has takes the parent's value. The model hands its fields to its blocks
so, and a block to its MLPs; a new hyperparameter of, e.g., the token-mixing MLP is the
same field declared on the MLP, its block and the model, with nothing passed by hand.
(One level at a time: under nn.scan and nn.remat a block's parent is a lifted scope,
not the model, so each level declares what it hands on.)
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_NOT_INHERITED = ("parent", "name")


def inherited(parent, child, given=()) -> dict:
  """The fields of `child` (a module class), other than `given`, that `parent` (a module
  or module class instance) also has, with its values."""
  own = {f.name for f in dataclasses.fields(parent)}
  return {f.name: getattr(parent, f.name) for f in dataclasses.fields(child)
          if f.name in own and f.name not in given and f.name not in _NOT_INHERITED}


def inherit(parent: nn.Module, child, **given):
  """`child(**given)`, its other fields that `parent` has set to the parent's values."""
  return child(**inherited(parent, child, given), **given)


def gelu(x):
  """The released Mixers' GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return nn.gelu(x, approximate=True)


def drop_path(x, rate, rng) -> jax.Array:
  """Stochastic depth: zero a residual branch per example, rescale the kept ones.

  Kept branches are divided by the survival probability (1 - rate), as in timm's
  DropPath and big_vision, so evaluation needs no rescaling.
  """
  keep = 1.0 - rate  # A number, or a float32 array under scan: x keeps its dtype.
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def residual(module: nn.Module, x, branch, train: bool, drop_rate):
  """x + branch, the branch dropped per example at `drop_rate` in training (None: never)."""
  if train and drop_rate is not None:
    branch = drop_path(branch, drop_rate, module.make_rng("dropout"))
  return x + branch


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense back to the input width, over the last axis; dropout after
  the GELU and after the output. `approximate_gelu`: tanh GELU (the Mixer's) or exact."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    y = nn.gelu(y, approximate=self.approximate_gelu)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


def stem(images, patch_size: int, hidden_dim: int, dtype):
  """Non-overlapping P x P patches, each projected to `hidden_dim` channels (`stem`):
  (B, H, W, 3) -> (B, H/P * W/P, C), tokens in row-major raster order."""
  check_image_shape(images.shape, patch_size)
  p = patch_size
  x = nn.Conv(hidden_dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
              name="stem")(images)
  return jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))


def head(x, num_classes: Optional[int], dtype, bias_init: float = 0.0):
  """The mean over tokens and a zero-initialised linear classifier (`head`; none when
  num_classes is 0 or None: the pooled pre-logits), returned in float32."""
  x = jnp.mean(x, axis=1)
  if num_classes:
    x = nn.Dense(num_classes, dtype=dtype, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(bias_init), name="head")(x)
  return x.astype(jnp.float32)


def check_image_shape(shape, patch_size):
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Images must be NHWC with 3 channels, got shape {tuple(shape)}.")
  for side in shape[1:3]:
    if side % patch_size:
      raise ValueError(
          f"Image side {side} is not divisible by the patch size {patch_size}; use an image "
          f"size that is a multiple of {patch_size} (e.g. {patch_size * max(side // patch_size, 1)}).")
