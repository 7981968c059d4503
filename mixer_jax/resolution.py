"""Higher-resolution fine-tuning initialisation (MLP-Mixer paper, Appendix C).

The token-mixing MLP of a Mixer has kernels of shape (S, D_S) and (D_S, S), so a
checkpoint pre-trained with S tokens (e.g. 14x14 = 196 for B/16 at 224 px) cannot be
used as is at a higher resolution. When the new image side is K times the old one
(integer K; square images), the new token count is S' = K^2 * S and the paper builds
the new token-mixing MLP as follows:

- Split the new (K*h) x (K*w) token grid (h = w = sqrt(S)) into K^2 contiguous
  spatial windows of h x w tokens each. Tokens stay in row-major raster order on the
  big grid: token t = R * (K*w) + C lies in window k = (R // h) * K + (C // w) and has
  the local (within-window, row-major) index local(t) = (R % h) * w + (C % w).
- The hidden layer gets K^2 * D_S units, D_S per window. `Dense_0` is block-diagonal:
    new_kernel0[t, k*D_S + d] = old_kernel0[local(t), d] if window(t) == k else 0,
    new_bias0 = old_bias0 tiled K^2 times,
  and `Dense_1` is the matching block-diagonal map back to the tokens:
    new_kernel1[k*D_S + d, t] = old_kernel1[d, local(t)] if window(t) == k else 0,
    new_bias1[t] = old_bias1[local(t)].

Why the fine-tuned model starts as K^2 independent copies of the pre-trained one:
the stem is per patch, LayerNorm and the channel-mixing MLP act on each token on
its own, and with the block-diagonal kernels a token's token-mixing output depends
only on the tokens of its own window, through exactly the pre-trained weights (the
window's tokens play the role of the S tokens of the original grid, in the same
order). So every window of tokens evolves exactly as the pre-trained model does on
the corresponding contiguous crop of the image. The global average pool then takes
the mean of the K^2 (equal-sized) windows' pooled features, i.e. the mean of the
pre-trained features of the K^2 crops, and since the head is affine the initial
logits are the mean of the K^2 crops' pre-trained logits. Fine-tuning then fills in
the zero off-diagonal blocks so information flows between windows.

Consequently the model must be built with tokens_mlp_dim = K^2 * D_S (see
`hires_model_overrides`), and only image sides that are integer multiples of the
pre-training side are allowed (e.g. 224, 448, 672 px for a 224-px B/16 checkpoint).

ResMLP and gMLP (the same argument, extended here): their token mixers are one S x S
linear map with a bias (ResMLP's `token_mixing`, gMLP's `spatial_gating/spatial_proj`)
and everything else acts per token, so the new (K^2 S) x (K^2 S) map is block-diagonal
over the same windows (`expand_square_token_map`):
    new_kernel[t, t'] = old_kernel[local(t), local(t')] if window(t) == window(t') else 0,
    new_bias[t] = old_bias[local(t)],
and the model starts as K^2 copies of the pre-trained one; no size field changes.
"""

import math
from typing import Any, Dict, Mapping, Optional

import numpy as np
from absl import logging
from flax import traverse_util

from mixer_jax import errors

_TOKEN_KEY = "MixerBlock_0/token_mixing/Dense_0/kernel"
# The S x S token maps of ResMLP and gMLP (Flax kernel keys, any block).
_SQUARE_MAPS = ("/token_mixing/kernel", "/spatial_gating/spatial_proj/kernel")


def _square_map_keys(flat: Mapping[str, Any]):
  """The kernel keys of the S x S token maps in `flat`, sorted."""
  return sorted(k for k in flat if k.endswith(_SQUARE_MAPS) and np.ndim(flat[k]) == 2)


def _isqrt_exact(n: int) -> Optional[int]:
  """sqrt(n) if n is a perfect square (n >= 0), else None."""
  if n < 0:
    return None
  r = math.isqrt(n)
  return r if r * r == n else None


def _allowed_sizes(patch: Optional[int], side: int) -> str:
  """'224, 448, 672 px' (or '14, 28, 42 tokens per side' without a patch size)."""
  if patch:
    return ", ".join(str(patch * side * k) for k in (1, 2, 3)) + " px"
  return ", ".join(str(side * k) for k in (1, 2, 3)) + " tokens per side"


def _resolution_error(source: str, old_tokens: int, new_tokens: int,
                      patch: Optional[int]) -> errors.CheckpointError:
  side = _isqrt_exact(old_tokens)
  new_side = _isqrt_exact(new_tokens)
  if side is None:
    return errors.CheckpointError(
        f"{source} was trained with {old_tokens} tokens, which is not a square grid, so "
        f"it cannot be adapted to a model with {new_tokens} tokens; use the image size "
        "it was trained with.")
  old_desc = f"{side}x{side} = {old_tokens} tokens"
  new_desc = f"{new_tokens} tokens"
  if patch:
    old_desc += f" ({patch * side} px at patch {patch})"
    if new_side is not None:
      new_desc += f" ({patch * new_side} px)"
  return errors.CheckpointError(
      f"{source} was trained with {old_desc} but the model has {new_desc}, and it can "
      f"only be loaded at image sizes that are integer multiples K of its side "
      f"({_allowed_sizes(patch, side)}, ...) with tokens_mlp_dim = K^2 times its own.")


def resolution_factor(old_tokens: int, new_tokens: int, *, source: str = "checkpoint",
                      patch_size: Optional[int] = None) -> int:
  """K such that new_tokens = K^2 * old_tokens on square grids, else CheckpointError."""
  side = _isqrt_exact(old_tokens)
  if side is None or new_tokens % old_tokens:
    raise _resolution_error(source, old_tokens, new_tokens, patch_size)
  k = _isqrt_exact(new_tokens // old_tokens)
  if not k:
    raise _resolution_error(source, old_tokens, new_tokens, patch_size)
  return k


def window_index_maps(side: int, k: int):
  """For the (k*side)^2 raster-ordered tokens: (window index, local index) arrays."""
  big = k * side
  rows, cols = np.divmod(np.arange(big * big), big)
  window = (rows // side) * k + (cols // side)
  local = (rows % side) * side + (cols % side)
  return window, local


def expand_token_mixing(dense0_kernel, dense0_bias, dense1_kernel, dense1_bias, k: int):
  """Block-diagonal K^2-window expansion of one token-mixing MLP (see module doc).

  Args: the pre-trained (S, D_S), (D_S,), (D_S, S), (S,) arrays and the side ratio K.
  Returns: the (K^2 S, K^2 D_S), (K^2 D_S,), (K^2 D_S, K^2 S), (K^2 S,) arrays.
  """
  k0, b0 = np.asarray(dense0_kernel), np.asarray(dense0_bias)
  k1, b1 = np.asarray(dense1_kernel), np.asarray(dense1_bias)
  s, d_s = k0.shape
  side = _isqrt_exact(s)
  if side is None:
    raise errors.CheckpointError(
        f"Token-mixing kernel has {s} tokens, not a square grid; cannot expand it.")
  window, local = window_index_maps(side, k)
  n = k * k * s
  t = np.arange(n)
  cols = window[:, None] * d_s + np.arange(d_s)[None, :]  # (n, D_S) hidden units of t.
  new_k0 = np.zeros((n, k * k * d_s), k0.dtype)
  new_k0[t[:, None], cols] = k0[local]
  new_k1 = np.zeros((k * k * d_s, n), k1.dtype)
  new_k1[cols, t[:, None]] = k1[:, local].T
  return new_k0, np.tile(b0, k * k), new_k1, b1[local].copy()


def expand_square_token_map(kernel, bias, k: int):
  """Block-diagonal K^2-window expansion of an S x S token map (ResMLP, gMLP; see the
  module doc): (S, S), (S,) -> (K^2 S, K^2 S), (K^2 S,)."""
  w, b = np.asarray(kernel), np.asarray(bias)
  s = w.shape[0]
  side = _isqrt_exact(s)
  if side is None or w.shape != (s, s):
    raise errors.CheckpointError(
        f"Token map of shape {w.shape} is not square over a square grid; cannot expand it.")
  window, local = window_index_maps(side, k)
  same = window[:, None] == window[None, :]
  new_w = np.where(same, w[local[:, None], local[None, :]], np.zeros((), w.dtype))
  return new_w.astype(w.dtype), b[local].copy()


def _expand_square_maps(init_flat, pre_flat, source: str) -> Dict[str, Any]:
  keys = _square_map_keys(init_flat)
  if not keys or keys[0] not in pre_flat:
    return pre_flat
  new_tokens, old_tokens = (int(np.shape(f[keys[0]])[0]) for f in (init_flat, pre_flat))
  if new_tokens == old_tokens:
    return pre_flat
  stem = pre_flat.get("stem/kernel")
  patch = int(np.shape(stem)[0]) if stem is not None else None
  k = resolution_factor(old_tokens, new_tokens, source=source, patch_size=patch)
  out = dict(pre_flat)
  for key in _square_map_keys(pre_flat):
    bias = key[:-len("kernel")] + "bias"
    if bias not in pre_flat:
      raise errors.CheckpointError(f"{source} is missing parameter {bias}; it is not a "
                                   "complete checkpoint.")
    out[key], out[bias] = expand_square_token_map(pre_flat[key], pre_flat[bias], k)
  logging.info("%s: %d -> %d tokens (K=%d); block-diagonal token-map init.", source,
               old_tokens, new_tokens, k)
  return out


def expand_if_needed(init_flat: Mapping[str, Any], pre_flat: Mapping[str, Any], *,
                     source: str) -> Dict[str, Any]:
  """Adapts pre-trained token-mixing weights to the model's token count.

  Args:
    init_flat: the freshly initialised model's parameters, flat '/'-keyed.
    pre_flat: the pre-trained parameters, flat '/'-keyed.
    source: name of the checkpoint, for error messages.

  Returns:
    `pre_flat` itself when the token counts match (or when either tree lacks
    token-mixing kernels, which `load_pretrained` reports), otherwise a copy whose
    `MixerBlock_i/token_mixing/Dense_{0,1}/{kernel,bias}` (a ResMLP's or gMLP's S x S
    token maps) are the block-diagonal expansion for K = sqrt(S_model / S_checkpoint).

  Raises:
    errors.CheckpointError: the model's token count is not K^2 times the
      checkpoint's for an integer K >= 1, or the model's tokens_mlp_dim is not K^2
      times the checkpoint's.
  """
  if _TOKEN_KEY not in init_flat or _TOKEN_KEY not in pre_flat:
    return _expand_square_maps(init_flat, pre_flat, source)
  new_tokens, new_dim = (int(x) for x in np.shape(init_flat[_TOKEN_KEY]))
  old_tokens, old_dim = (int(x) for x in np.shape(pre_flat[_TOKEN_KEY]))
  if new_tokens == old_tokens:
    return pre_flat
  stem = pre_flat.get("stem/kernel")
  patch = int(np.shape(stem)[0]) if stem is not None else None
  k = resolution_factor(old_tokens, new_tokens, source=source, patch_size=patch)
  if new_dim != k * k * old_dim:
    raise errors.CheckpointError(
        f"{source} has tokens_mlp_dim {old_dim} and the model has {k}x its image side, "
        f"so the model must be built with tokens_mlp_dim={k * k * old_dim} (K^2 * D_S for "
        f"the block-diagonal high-resolution init) instead of {new_dim}.")
  out = dict(pre_flat)
  blocks = sorted({key.split("/")[0] for key in pre_flat
                   if key.startswith("MixerBlock_") and "/token_mixing/" in key})
  for block in blocks:
    prefix = f"{block}/token_mixing"
    names = [f"{prefix}/Dense_0/kernel", f"{prefix}/Dense_0/bias",
             f"{prefix}/Dense_1/kernel", f"{prefix}/Dense_1/bias"]
    missing = [n for n in names if n not in pre_flat]
    if missing:
      raise errors.CheckpointError(f"{source} is missing parameter {missing[0]}; it is "
                                       "not a complete Mixer checkpoint.")
    expanded = expand_token_mixing(*(pre_flat[n] for n in names), k)
    out.update(zip(names, expanded))
  logging.info("%s: %d -> %d tokens (K=%d); block-diagonal token-mixing init with "
               "tokens_mlp_dim %d -> %d.", source, old_tokens, new_tokens, k, old_dim,
               new_dim)
  return out


def hires_model_overrides(pretrained_info: Mapping[str, Any], image_size: int) -> Dict[str, int]:
  """`create_model` overrides for fine-tuning a checkpoint at `image_size` (square).

  Args:
    pretrained_info: the checkpoint's parameter tree, or `weights.describe(params)`,
      or the info dict of `weights.load_params` (keys 'model' and 'image_size').
    image_size: the fine-tuning image side in pixels.

  Returns:
    {"tokens_mlp_dim": K^2 * D_S}, K = image_size / pre-training side; {} for a ResMLP
    or gMLP parameter tree (their token maps grow with the tokens, no size changes).

  Raises:
    errors.CheckpointError: image_size is not an integer multiple of the
      pre-training side (or not divisible by the patch size).
  """
  info = dict(pretrained_info)
  if "num_tokens" in info:
    patch, tokens, d_s = info["patch_size"], info["num_tokens"], info.get("tokens_mlp_dim")
  elif "model" in info:
    model = info["model"]
    patch, d_s = model["patch_size"], model.get("tokens_mlp_dim")
    if not info.get("image_size"):
      raise errors.CheckpointError(
          "The checkpoint info has no image_size; pass its parameter tree instead.")
    tokens = (int(info["image_size"]) // int(patch)) ** 2
  else:
    flat = traverse_util.flatten_dict(info, sep="/")
    square = _square_map_keys(flat)
    if "stem/kernel" in flat and _TOKEN_KEY not in flat and square:
      patch, tokens = int(flat["stem/kernel"].shape[0]), int(flat[square[0]].shape[0])
      _check_image_size(image_size, patch, tokens)
      return {}
    if "stem/kernel" not in flat or _TOKEN_KEY not in flat:
      raise errors.CheckpointError("Not a Mixer parameter tree (no stem/kernel or "
                                   f"{_TOKEN_KEY}).")
    patch = int(flat["stem/kernel"].shape[0])
    tokens, d_s = (int(n) for n in flat[_TOKEN_KEY].shape)
  k = _check_image_size(image_size, patch, tokens)
  return {} if d_s is None else {"tokens_mlp_dim": k * k * int(d_s)}


def _check_image_size(image_size, patch: int, tokens: int) -> int:
  """K for fine-tuning a checkpoint of `tokens` tokens of `patch` px at `image_size`."""
  image_size = int(image_size)
  if image_size <= 0 or image_size % patch:
    side = _isqrt_exact(tokens) or 1
    raise errors.CheckpointError(
        f"Image size {image_size} is not a positive multiple of the patch size {patch}; "
        f"use an integer multiple of the checkpoint's side ({_allowed_sizes(patch, side)}, ...).")
  return resolution_factor(tokens, (image_size // patch) ** 2, source="The checkpoint",
                           patch_size=patch)
