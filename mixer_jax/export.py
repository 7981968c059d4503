r"""Exports a Mixer checkpoint for PyTorch/timm (safetensors) or as a released `.npz`.

  python -m mixer_jax.export --checkpoint=PATH --format=timm --output=model.safetensors
  python -m mixer_jax.export --checkpoint=WORKDIR --format=npz --output=Mixer-B_16.npz

PATH is a released-layout `.npz` or a training workdir / `checkpoints/<step>` of this
codebase (read with `checkpoint.load_params`).

`--format=timm` writes a `safetensors` file with timm's `MlpMixer` state-dict names:

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

with every torch `Linear` weight the transposed Flax kernel (out, in). All tensors are
contiguous float32. `timm_to_params` is the exact inverse.

Matching timm models (the `_224` suffix is only timm's default image size; pass
`img_size=` for other resolutions and `num_classes=` for other heads, e.g. 21843):
  S/32 mixer_s32_224, S/16 mixer_s16_224, B/32 mixer_b32_224, B/16 mixer_b16_224,
  L/32 mixer_l32_224, L/16 mixer_l16_224. H/14 has no timm entry: it is still
  exported (with a warning); build it as `timm.models.mlp_mixer.MlpMixer(patch_size=14,
  num_blocks=32, embed_dim=1280, mlp_ratio=(0.5, 4.0), ...)`.

GELU: the released Mixer models (and this codebase) use the tanh approximation of
GELU, whereas timm's Mixer uses exact-erf GELU by default. For identical logits
create the timm model with the tanh approximation:

  import functools, timm, torch.nn as nn
  from safetensors.torch import load_file
  model = timm.create_model("mixer_b16_224", pretrained=False, num_classes=1000,
                            act_layer=functools.partial(nn.GELU, approximate="tanh"))
  model.load_state_dict(load_file("model.safetensors"), strict=True)

(LayerNorm epsilon 1e-6 is already timm's default for Mixer.) timm expects NCHW
inputs; feed the same [-1, 1]-scaled images as this codebase, transposed.

`--format=npz` writes the released layout (`checkpoint.save_npz`), e.g. to turn a
training workdir into a single file that the public tools read.
"""

import os
import sys
from typing import Any, Dict, Mapping, Optional

import numpy as np
from absl import app, flags, logging

from mixer_jax import checkpoint
from mixer_jax import errors
from mixer_jax import paths

FORMATS = ("timm", "npz")

# (patch, hidden, blocks, tokens_mlp_dim, channels_mlp_dim) -> timm architecture name.
TIMM_MODELS = {
    (32, 512, 8, 256, 2048): "mixer_s32_224",
    (16, 512, 8, 256, 2048): "mixer_s16_224",
    (32, 768, 12, 384, 3072): "mixer_b32_224",
    (16, 768, 12, 384, 3072): "mixer_b16_224",
    (32, 1024, 24, 512, 4096): "mixer_l32_224",
    (16, 1024, 24, 512, 4096): "mixer_l16_224",
}

_BLOCK_MAP = (  # (timm module, Flax module) inside a block.
    ("norm1", "LayerNorm_0"),
    ("mlp_tokens.fc1", "token_mixing/Dense_0"),
    ("mlp_tokens.fc2", "token_mixing/Dense_1"),
    ("norm2", "LayerNorm_1"),
    ("mlp_channels.fc1", "channel_mixing/Dense_0"),
    ("mlp_channels.fc2", "channel_mixing/Dense_1"),
)


def _f32(x) -> np.ndarray:
  if hasattr(x, "detach"):  # A torch tensor.
    x = x.detach().cpu().numpy()
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _key_map(flat_keys) -> Dict[str, str]:
  """Flax flat key -> timm key, for the modules present in `flat_keys`."""
  keys = set(flat_keys)
  mapping = {"stem/kernel": "stem.proj.weight", "stem/bias": "stem.proj.bias",
             "pre_head_layer_norm/scale": "norm.weight",
             "pre_head_layer_norm/bias": "norm.bias",
             "head/kernel": "head.weight", "head/bias": "head.bias"}
  blocks = sorted({int(k.split("/")[0][len("MixerBlock_"):]) for k in keys
                   if k.startswith("MixerBlock_")})
  for i in blocks:
    for timm_mod, flax_mod in _BLOCK_MAP:
      is_norm = flax_mod.startswith("LayerNorm")
      mapping[f"MixerBlock_{i}/{flax_mod}/{'scale' if is_norm else 'kernel'}"] = (
          f"blocks.{i}.{timm_mod}.weight")
      mapping[f"MixerBlock_{i}/{flax_mod}/bias"] = f"blocks.{i}.{timm_mod}.bias"
  return mapping


def params_to_timm(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Nested Flax params -> timm `MlpMixer` state dict (contiguous float32 numpy)."""
  flat = checkpoint.flatten(params)
  mapping = _key_map(flat)
  unknown = sorted(set(flat) - set(mapping))
  if unknown:
    raise errors.CheckpointError(
        f"Parameter {unknown[0]} has no timm equivalent; it is not a Mixer parameter tree.")
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key == "stem/kernel":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.
    elif key.endswith("/kernel"):
      value = value.T  # Flax (in, out) -> torch Linear (out, in).
    out[mapping[key]] = _f32(value)
  return out


def timm_to_params(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """timm `MlpMixer` state dict (numpy arrays or torch tensors) -> nested Flax params."""
  names = list(state_dict)
  flax_keys = set()
  for name in names:  # Recover the block indices from the timm names.
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
      flax_keys.add(f"MixerBlock_{int(parts[1])}/x")
  inverse = {v: k for k, v in _key_map(flax_keys).items()}
  unknown = sorted(set(names) - set(inverse))
  if unknown:
    raise errors.CheckpointError(
        f"State-dict entry {unknown[0]} is not part of timm's MlpMixer; pass the state "
        "dict of a timm Mixer model.")
  flat = {}
  for name in names:
    value = _f32(state_dict[name])
    key = inverse[name]
    if key == "stem/kernel":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    elif key.endswith("/kernel"):
      value = value.T
    flat[key] = np.ascontiguousarray(value)
  return checkpoint.unflatten(flat)


def timm_model_name(model_fields: Mapping[str, int]) -> Optional[str]:
  """timm architecture name for the size fields of `create_model`, or None."""
  key = tuple(int(model_fields[f]) for f in ("patch_size", "hidden_dim", "num_blocks",
                                              "tokens_mlp_dim", "channels_mlp_dim"))
  return TIMM_MODELS.get(key)


def timm_constructor(info: Mapping[str, Any]) -> str:
  """Python expression that builds the matching timm model (tanh GELU)."""
  m = info["model"]
  act = "act_layer=functools.partial(torch.nn.GELU, approximate='tanh')"
  extra = f"num_classes={int(info.get('num_classes') or 0)}"
  if info.get("image_size"):
    extra += f", img_size={int(info['image_size'])}"
  name = timm_model_name(m)
  if name:
    return f"timm.create_model({name!r}, pretrained=False, {extra}, {act})"
  ratio = (m["tokens_mlp_dim"] / m["hidden_dim"], m["channels_mlp_dim"] / m["hidden_dim"])
  return (f"timm.models.mlp_mixer.MlpMixer({extra}, patch_size={m['patch_size']}, "
          f"num_blocks={m['num_blocks']}, embed_dim={m['hidden_dim']}, "
          f"mlp_ratio={ratio!r}, {act})")


def _check_output(path: str) -> None:
  """Fails with one sentence (CheckpointError) unless `path` can be written."""
  if not path:
    raise errors.CheckpointError("--output is required; pass the file to write.")
  if os.path.isdir(path):
    raise errors.CheckpointError(f"Output {path} is a directory; pass a file name.")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    probe = f"{path}.probe-{os.getpid()}"
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    raise errors.CheckpointError(
        f"Cannot write output {path} ({e.strerror or e}); choose a writable location.") from None


def export(checkpoint_path: str, fmt: str, output: str) -> Dict[str, Any]:
  """Writes `output` in `fmt` ('timm' or 'npz'); returns the checkpoint info."""
  if fmt not in FORMATS:
    raise errors.CheckpointError(
        f"Unknown format {fmt!r}; use --format=timm or --format=npz.")
  _check_output(output)
  params, info = checkpoint.load_params(checkpoint_path)
  if fmt == "npz":
    try:
      checkpoint.save_npz(params, output)
    except OSError as e:
      raise errors.CheckpointError(
          f"Cannot write output {output} ({e.strerror or e}); choose a writable location.") from None
    return info
  from safetensors.numpy import save_file  # Only needed for this format.
  tensors = params_to_timm(params)
  name = timm_model_name(info["model"])
  if name is None:
    logging.warning("No timm model name matches %s (e.g. H/14); exporting anyway; build it "
                    "with %s.", info["model"], timm_constructor(info))
  metadata = {"format": "pt", "timm_model": name or "",
              "num_classes": str(int(info.get("num_classes") or 0)),
              "image_size": str(info.get("image_size") or ""),
              "gelu": "tanh", "layer_norm_eps": "1e-6"}
  tmp = f"{output}.tmp-{os.getpid()}"
  try:
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, output)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise errors.CheckpointError(
        f"Cannot write output {output} ({e.strerror or e}); choose a writable location.") from None
  return info


FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (only when run as a program, so that importing this
  module next to other CLIs' modules does not clash on flag names)."""
  flags.DEFINE_string("checkpoint", None, "Released .npz or training workdir / step dir.")
  flags.DEFINE_string("format", "timm", "Output format: 'timm' (safetensors) or 'npz'.")
  flags.DEFINE_string("output", None, "File to write.")


def main(argv):
  if len(argv) > 1:
    print(f"Unexpected arguments {argv[1:]}; use --checkpoint, --format and --output.",
          file=sys.stderr)
    sys.exit(2)
  if not FLAGS.checkpoint:
    print("--checkpoint is required; pass a .npz file or a training workdir.", file=sys.stderr)
    sys.exit(2)
  try:
    info = export(paths.resolve(FLAGS.checkpoint), FLAGS.format, paths.resolve(FLAGS.output))
  except errors.CheckpointError as e:
    print(str(e), file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {FLAGS.output} ({FLAGS.format}).")
  if FLAGS.format == "timm":
    print(f"Load it with: model = {timm_constructor(info)}; "
          "model.load_state_dict(safetensors.torch.load_file(path), strict=True)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
