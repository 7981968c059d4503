"""timm's `MlpMixer` state-dict layouts <-> our parameter trees, both ways, losslessly,
for the three families timm builds with that class (timm 1.0.31, models/mlp_mixer.py).

Every family:
  stem.proj.weight (C, 3, P, P)   <- stem/kernel (P, P, 3, C), HWIO -> OIHW
  stem.proj.bias                  <- stem/bias
  head.{weight,bias}              <- head/{kernel,bias} (absent for a features model)
MLP-Mixer (`mixer_*`, MixerBlock):
  blocks.{i}.norm1.{weight,bias}  <- MixerBlock_{i}/LayerNorm_0/{scale,bias}
  blocks.{i}.mlp_tokens.fc{1,2}   <- MixerBlock_{i}/token_mixing/Dense_{0,1}
  blocks.{i}.norm2.{weight,bias}  <- MixerBlock_{i}/LayerNorm_1/{scale,bias}
  blocks.{i}.mlp_channels.fc{1,2} <- MixerBlock_{i}/channel_mixing/Dense_{0,1}
  norm.{weight,bias}              <- pre_head_layer_norm/{scale,bias}
ResMLP (`resmlp_*`, ResBlock, Affine norms):
  blocks.{i}.norm1.{alpha,beta} (1, 1, C) <- ResMlpBlock_{i}/Affine_0/{alpha,beta} (C,)
  blocks.{i}.linear_tokens        <- ResMlpBlock_{i}/token_mixing
  blocks.{i}.ls1 (C,)             <- ResMlpBlock_{i}/LayerScale_0/scale
  blocks.{i}.norm2.{alpha,beta}   <- ResMlpBlock_{i}/Affine_1/{alpha,beta}
  blocks.{i}.mlp_channels.fc{1,2} <- ResMlpBlock_{i}/channel_mixing/Dense_{0,1}
  blocks.{i}.ls2                  <- ResMlpBlock_{i}/LayerScale_1/scale
  norm.{alpha,beta} (1, 1, C)     <- pre_head_affine/{alpha,beta}
gMLP (`gmlp_*`, SpatialGatingBlock, GatedMlp):
  blocks.{i}.norm                 <- GMlpBlock_{i}/LayerNorm_0
  blocks.{i}.mlp_channels.fc1     <- GMlpBlock_{i}/channel_proj_in
  blocks.{i}.mlp_channels.gate.norm <- GMlpBlock_{i}/spatial_gating/LayerNorm_0
  blocks.{i}.mlp_channels.gate.proj <- GMlpBlock_{i}/spatial_gating/spatial_proj
  blocks.{i}.mlp_channels.fc2     <- GMlpBlock_{i}/channel_proj_out
  norm.{weight,bias}              <- pre_head_layer_norm/{scale,bias}

with every torch `Linear` weight the transposed Flax kernel (out, in) and a LayerNorm's
weight its scale. `export.py` writes these layouts (`params_to_timm`), `weights.py`
reads them back (`timm_to_params`); float32 arrays round-trip bit for bit. The family
of a tree is the name of its blocks; of a state dict, the modules its blocks hold.
"""

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from mixer_jax import errors

# (Flax module, timm module, kind): kind "dense" maps kernel/bias to weight/bias, "norm"
# scale/bias to weight/bias, "affine" alpha/beta to alpha/beta, "scale" the LayerScale
# `scale` to the timm parameter itself.
_BLOCK_MAPS = {
    "mixer": (("LayerNorm_0", "norm1", "norm"),
              ("token_mixing/Dense_0", "mlp_tokens.fc1", "dense"),
              ("token_mixing/Dense_1", "mlp_tokens.fc2", "dense"),
              ("LayerNorm_1", "norm2", "norm"),
              ("channel_mixing/Dense_0", "mlp_channels.fc1", "dense"),
              ("channel_mixing/Dense_1", "mlp_channels.fc2", "dense")),
    "resmlp": (("Affine_0", "norm1", "affine"),
               ("token_mixing", "linear_tokens", "dense"),
               ("LayerScale_0", "ls1", "scale"),
               ("Affine_1", "norm2", "affine"),
               ("channel_mixing/Dense_0", "mlp_channels.fc1", "dense"),
               ("channel_mixing/Dense_1", "mlp_channels.fc2", "dense"),
               ("LayerScale_1", "ls2", "scale")),
    "gmlp": (("LayerNorm_0", "norm", "norm"),
             ("channel_proj_in", "mlp_channels.fc1", "dense"),
             ("spatial_gating/LayerNorm_0", "mlp_channels.gate.norm", "norm"),
             ("spatial_gating/spatial_proj", "mlp_channels.gate.proj", "dense"),
             ("channel_proj_out", "mlp_channels.fc2", "dense")),
}
_TOP_MAPS = {
    "mixer": (("pre_head_layer_norm", "norm", "norm"),),
    "resmlp": (("pre_head_affine", "norm", "affine"),),
    "gmlp": (("pre_head_layer_norm", "norm", "norm"),),
}
BLOCKS = {"mixer": "MixerBlock", "resmlp": "ResMlpBlock", "gmlp": "GMlpBlock"}
TITLES = {"mixer": "Mixer", "resmlp": "ResMLP", "gmlp": "gMLP"}
# What the state dict of each family is, in messages.
TIMM_NAMES = {"mixer": "timm's MlpMixer",
              "resmlp": "timm's ResMLP (MlpMixer of ResBlock)",
              "gmlp": "timm's gMLP (MlpMixer of SpatialGatingBlock)"}
# A timm module found only in the blocks of one family.
_MARKERS = (("linear_tokens", "resmlp"), ("mlp_channels.gate.", "gmlp"),
            ("mlp_tokens.", "mixer"))
_LEAVES = {"dense": (("kernel", "weight"), ("bias", "bias")),
           "norm": (("scale", "weight"), ("bias", "bias")),
           "affine": (("alpha", "alpha"), ("beta", "beta")),
           "scale": (("scale", None),)}
_STEM_TO_TIMM = (3, 2, 0, 1)  # HWIO -> OIHW.
_STEM_FROM_TIMM = (2, 3, 1, 0)  # OIHW -> HWIO.


def _pairs(flax_module: str, timm_module: str, kind: str):
  for flax_leaf, timm_leaf in _LEAVES[kind]:
    yield (f"{flax_module}/{flax_leaf}",
           f"{timm_module}.{timm_leaf}" if timm_leaf else timm_module)


def family_of_keys(flat_keys: Iterable[str]) -> Optional[str]:
  """"mixer", "resmlp" or "gmlp": the family whose blocks the Flax keys hold, or None."""
  for key in flat_keys:
    top = str(key).split("/")[0]
    for family, block in BLOCKS.items():
      if top.startswith(f"{block}_") and top[len(block) + 1:].isdigit():
        return family
  return None


def family_of_state_dict(names: Iterable[str]) -> Optional[str]:
  """The family of a timm state dict by the modules of its blocks, or None."""
  names = [str(n) for n in names]
  for marker, family in _MARKERS:
    if any(n.startswith("blocks.") and f".{marker}" in n for n in names):
      return family
  return None


def key_map(flat_keys: Iterable[str], family: Optional[str] = None) -> Dict[str, str]:
  """Flax flat key -> timm name, for the blocks present in `flat_keys` (the family
  found from their names unless given)."""
  flat_keys = list(flat_keys)
  family = family or family_of_keys(flat_keys) or "mixer"
  block = BLOCKS[family]
  mapping = dict(_pairs("stem", "stem.proj", "dense"))
  mapping.update(_pairs("head", "head", "dense"))
  for flax_mod, timm_mod, kind in _TOP_MAPS[family]:
    mapping.update(_pairs(flax_mod, timm_mod, kind))
  indices = sorted({int(k.split("/")[0][len(block) + 1:]) for k in flat_keys
                    if k.split("/")[0][len(block) + 1:].isdigit()
                    and k.startswith(f"{block}_")})
  for i in indices:
    for flax_mod, timm_mod, kind in _BLOCK_MAPS[family]:
      mapping.update(_pairs(f"{block}_{i}/{flax_mod}", f"blocks.{i}.{timm_mod}", kind))
  return mapping


def timm_shape(flax_key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The shape that the Flax parameter `flax_key` of `shape` has in timm's layout."""
  shape = tuple(shape)
  if flax_key == "stem/kernel" and len(shape) == 4:
    return tuple(shape[i] for i in _STEM_TO_TIMM)
  if flax_key.endswith(("/alpha", "/beta")):
    return (1, 1) + shape  # timm's Affine keeps (1, 1, C) parameters.
  return shape[::-1] if flax_key.endswith("/kernel") else shape


def _f32(x) -> np.ndarray:
  if hasattr(x, "detach"):  # A torch tensor.
    x = x.detach().cpu().numpy()
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def params_to_timm(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Nested Flax params of any family -> timm state dict (contiguous float32 numpy)."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  family = family_of_keys(flat)
  if family is None:
    raise errors.CheckpointError(
        "The parameter tree holds no MixerBlock_<i>, ResMlpBlock_<i> or GMlpBlock_<i> "
        "blocks; it is not a Mixer, ResMLP or gMLP parameter tree.")
  mapping = key_map(flat, family)
  unknown = sorted(set(flat) - set(mapping))
  if unknown:
    raise errors.CheckpointError(
        f"Parameter {unknown[0]} has no timm equivalent; it is not a "
        f"{TITLES[family]} parameter tree.")
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key == "stem/kernel":
      value = value.transpose(_STEM_TO_TIMM)
    elif key.endswith("/kernel"):
      value = value.T  # Flax (in, out) -> torch Linear (out, in).
    elif key.endswith(("/alpha", "/beta")):
      value = value.reshape((1, 1) + value.shape)
    out[mapping[key]] = _f32(value)
  return out


def timm_to_params(state_dict: Mapping[str, Any], source: str = "The state dict"
                   ) -> Dict[str, Any]:
  """timm state dict (numpy arrays or torch tensors) of a Mixer, ResMLP or gMLP ->
  nested Flax params.

  Entries are cast to float32 (the caller checks shapes and dtypes against the
  timm names and shapes first where that matters: weights.load_safetensors).
  """
  family = family_of_state_dict(state_dict) or "mixer"
  blocks = set()
  for name in state_dict:  # Recover the block indices from the timm names.
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
      blocks.add(f"{BLOCKS[family]}_{int(parts[1])}/")
  inverse = {v: k for k, v in key_map(blocks, family).items()}
  unknown = sorted(set(state_dict) - set(inverse))
  if unknown:
    raise errors.CheckpointError(
        f"{source} entry {unknown[0]} is not part of {TIMM_NAMES[family]}; pass the state "
        "dict of a timm Mixer, ResMLP or gMLP model (what `mixer_jax.export --format=timm` "
        "writes).")
  flat = {}
  for name, value in state_dict.items():
    value, key = _f32(value), inverse[name]
    if key == "stem/kernel":
      if value.ndim != 4:
        raise errors.CheckpointError(
            f"{source} entry {name} has shape {value.shape}, not (C, 3, P, P); pass the "
            "state dict of a timm Mixer, ResMLP or gMLP model.")
      value = value.transpose(_STEM_FROM_TIMM)
    elif key.endswith("/kernel"):
      value = value.T
    elif key.endswith(("/alpha", "/beta")) and value.ndim == 3 and value.shape[:2] == (1, 1):
      value = value.reshape(value.shape[2:])  # Other shapes fail the caller's check.
    flat[key] = np.ascontiguousarray(value)
  return traverse_util.unflatten_dict(flat, sep="/")
