"""What the three families share: the patch stem, GELU, the MLP, the residual with
stochastic depth, and the pooled head.

A block reads its hyperparameters from the model by name (`inherit`): a field that a
submodule declares and the model (or any module between) holds takes that value, so a
new hyperparameter of, e.g., the token-mixing MLP is one field on the MLP and the same
field on the model, with nothing passed along by hand in between.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_NOT_INHERITED = ("parent", "name")


def inherit(module: nn.Module, child, **given):
  """`child(**given)` with every other field of `child` that `module` or one of its
  parents holds set to the nearest one's value."""
  return child(**inherited(module, child, given), **given)


def inherited(module: nn.Module, child, given=()) -> dict:
  """The fields of `child` (a module class) not in `given` that `module` or one of its
  parents holds, with the nearest one's values."""
  fields = {}
  for field in dataclasses.fields(child):
    if field.name in given or field.name in _NOT_INHERITED:
      continue
    owner = module
    while isinstance(owner, nn.Module):
      if field.name in {f.name for f in dataclasses.fields(owner)}:
        fields[field.name] = getattr(owner, field.name)
        break
      owner = owner.parent
  return fields


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
