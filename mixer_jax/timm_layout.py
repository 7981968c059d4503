"""timm's `MlpMixer` state-dict layout <-> our parameter tree, both ways, losslessly.

  stem.proj.weight (C, 3, P, P)   <- stem/kernel (P, P, 3, C), HWIO -> OIHW
  stem.proj.bias                  <- stem/bias
  blocks.{i}.norm1.{weight,bias}  <- MixerBlock_{i}/LayerNorm_0/{scale,bias}
  blocks.{i}.mlp_tokens.fc{1,2}.{weight,bias}
                                  <- MixerBlock_{i}/token_mixing/Dense_{0,1}
  blocks.{i}.norm2.{weight,bias}  <- MixerBlock_{i}/LayerNorm_1/{scale,bias}
  blocks.{i}.mlp_channels.fc{1,2}.{weight,bias}
                                  <- MixerBlock_{i}/channel_mixing/Dense_{0,1}
  norm.{weight,bias}              <- pre_head_layer_norm/{scale,bias}
  head.{weight,bias}              <- head/{kernel,bias} (absent for a features model)

with every torch `Linear` weight the transposed Flax kernel (out, in). `export.py`
writes this layout (`params_to_timm`), `checkpoint.py` reads it back
(`timm_to_params`); float32 arrays round-trip bit for bit.
"""

from typing import Any, Dict, Iterable, Mapping, Tuple

import numpy as np
from flax import traverse_util

from mixer_jax import errors

_BLOCK_MAP = (  # (timm module, Flax module) inside a block.
    ("norm1", "LayerNorm_0"),
    ("mlp_tokens.fc1", "token_mixing/Dense_0"),
    ("mlp_tokens.fc2", "token_mixing/Dense_1"),
    ("norm2", "LayerNorm_1"),
    ("mlp_channels.fc1", "channel_mixing/Dense_0"),
    ("mlp_channels.fc2", "channel_mixing/Dense_1"),
)
_STEM_TO_TIMM = (3, 2, 0, 1)  # HWIO -> OIHW.
_STEM_FROM_TIMM = (2, 3, 1, 0)  # OIHW -> HWIO.


def key_map(flat_keys: Iterable[str]) -> Dict[str, str]:
  """Flax flat key -> timm name, for the blocks present in `flat_keys`."""
  mapping = {"stem/kernel": "stem.proj.weight", "stem/bias": "stem.proj.bias",
             "pre_head_layer_norm/scale": "norm.weight",
             "pre_head_layer_norm/bias": "norm.bias",
             "head/kernel": "head.weight", "head/bias": "head.bias"}
  blocks = sorted({int(k.split("/")[0][len("MixerBlock_"):]) for k in flat_keys
                   if k.startswith("MixerBlock_")})
  for i in blocks:
    for timm_mod, flax_mod in _BLOCK_MAP:
      is_norm = flax_mod.startswith("LayerNorm")
      mapping[f"MixerBlock_{i}/{flax_mod}/{'scale' if is_norm else 'kernel'}"] = (
          f"blocks.{i}.{timm_mod}.weight")
      mapping[f"MixerBlock_{i}/{flax_mod}/bias"] = f"blocks.{i}.{timm_mod}.bias"
  return mapping


def timm_shape(flax_key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The shape that the Flax parameter `flax_key` of `shape` has in timm's layout."""
  shape = tuple(shape)
  if flax_key == "stem/kernel" and len(shape) == 4:
    return tuple(shape[i] for i in _STEM_TO_TIMM)
  return shape[::-1] if flax_key.endswith("/kernel") else shape


def _f32(x) -> np.ndarray:
  if hasattr(x, "detach"):  # A torch tensor.
    x = x.detach().cpu().numpy()
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def params_to_timm(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Nested Flax params -> timm `MlpMixer` state dict (contiguous float32 numpy)."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  mapping = key_map(flat)
  unknown = sorted(set(flat) - set(mapping))
  if unknown:
    raise errors.CheckpointError(
        f"Parameter {unknown[0]} has no timm equivalent; it is not a Mixer parameter tree.")
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key == "stem/kernel":
      value = value.transpose(_STEM_TO_TIMM)
    elif key.endswith("/kernel"):
      value = value.T  # Flax (in, out) -> torch Linear (out, in).
    out[mapping[key]] = _f32(value)
  return out


def timm_to_params(state_dict: Mapping[str, Any], source: str = "The state dict"
                   ) -> Dict[str, Any]:
  """timm `MlpMixer` state dict (numpy arrays or torch tensors) -> nested Flax params.

  Entries are cast to float32 (the caller checks dtypes first where that matters).
  """
  blocks = set()
  for name in state_dict:  # Recover the block indices from the timm names.
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
      blocks.add(f"MixerBlock_{int(parts[1])}/")
  inverse = {v: k for k, v in key_map(blocks).items()}
  unknown = sorted(set(state_dict) - set(inverse))
  if unknown:
    raise errors.CheckpointError(
        f"{source} entry {unknown[0]} is not part of timm's MlpMixer; pass the state dict "
        "of a timm Mixer model (what `mixer_jax.export --format=timm` writes).")
  flat = {}
  for name, value in state_dict.items():
    value, key = _f32(value), inverse[name]
    if key == "stem/kernel":
      if value.ndim != 4:
        raise errors.CheckpointError(
            f"{source} entry {name} has shape {value.shape}, not (C, 3, P, P); pass the "
            "state dict of a timm Mixer model.")
      value = value.transpose(_STEM_FROM_TIMM)
    elif key.endswith("/kernel"):
      value = value.T
    flat[key] = np.ascontiguousarray(value)
  return traverse_util.unflatten_dict(flat, sep="/")
