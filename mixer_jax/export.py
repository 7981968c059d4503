r"""Exports a Mixer, ResMLP or gMLP checkpoint for PyTorch/timm (safetensors) or as `.npz`.

  python -m mixer_jax.export --checkpoint=PATH --format=timm --output=model.safetensors
  python -m mixer_jax.export --checkpoint=WORKDIR --format=npz --output=Mixer-B_16.npz

Flags:
  --checkpoint  a released-layout `.npz`, a `.safetensors` in timm's layout (what
                --format=timm writes) or a training workdir / `checkpoints/<step>` of
                this codebase (read with `weights.load_params`, which checks every
                key, shape and dtype of a file against the Mixer it describes).
  --format      `timm` (default) or `npz`.
  --output      the file to write: `.safetensors` for timm, `.npz` for npz (a name with
                the other format's extension is refused). Written atomically (temp
                file, then rename): a failed export leaves no partial file.
  --overwrite   replace an existing --output (default: refuse).

`--format=timm` writes a `safetensors` file with timm's `MlpMixer` state-dict names
of the checkpoint's family, the layouts of `timm_layout.py` (every torch `Linear`
weight is the transposed Flax kernel, the stem OIHW, ResMLP's Affine parameters
(1, 1, C)). All tensors are contiguous float32; `timm_to_params` is the exact inverse,
and `weights.load_params` reads such a file back bit for bit.

ResMLP and gMLP: `timm.create_model("resmlp_12_224", ...)` etc. (the variant name plus
`_224`) for the named sizes, otherwise `timm.models.mlp_mixer.MlpMixer` with the
family's `block_layer` (the printed constructor); both use timm's own exact GELU, as
this codebase does for them, so no `act_layer` is needed.

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

`--format=npz` writes the released layout (`weights.save_npz`), e.g. to turn a
training workdir into a single file that the public tools read.
"""

import os
import sys
from typing import Any, Dict, Mapping, Optional

from absl import app, flags, logging

from mixer_jax import errors
from mixer_jax import models
from mixer_jax import paths
from mixer_jax import weights
from mixer_jax.timm_layout import params_to_timm, timm_to_params  # noqa: F401  (API)

FORMATS = ("timm", "npz")
EXTENSIONS = {"timm": ".safetensors", "npz": ".npz"}

# (patch, hidden, blocks, tokens_mlp_dim, channels_mlp_dim) -> timm architecture name.
TIMM_MODELS = {
    (32, 512, 8, 256, 2048): "mixer_s32_224",
    (16, 512, 8, 256, 2048): "mixer_s16_224",
    (32, 768, 12, 384, 3072): "mixer_b32_224",
    (16, 768, 12, 384, 3072): "mixer_b16_224",
    (32, 1024, 24, 512, 4096): "mixer_l32_224",
    (16, 1024, 24, 512, 4096): "mixer_l16_224",
}


def timm_model_name(model_fields: Mapping[str, int], family: str = "mixer") -> Optional[str]:
  """timm architecture name for the size fields of `create_model`, or None."""
  if family != "mixer":
    name = models.model_name(family, model_fields)
    return f"{name}_224" if name in models.family_named(family).names else None
  key = tuple(int(model_fields[f]) for f in ("patch_size", "hidden_dim", "num_blocks",
                                              "tokens_mlp_dim", "channels_mlp_dim"))
  return TIMM_MODELS.get(key)


# timm's block and norm layers of each family, for models without a timm name.
_TIMM_LAYERS = {"resmlp": "block_layer=timm.models.mlp_mixer.ResBlock, "
                          "norm_layer=timm.models.mlp_mixer.Affine",
                "gmlp": "block_layer=timm.models.mlp_mixer.SpatialGatingBlock, "
                        "mlp_layer=timm.layers.GatedMlp"}


def timm_constructor(info: Mapping[str, Any], family: str = "mixer") -> str:
  """Python expression that builds the matching timm model (the Mixer with tanh GELU,
  ResMLP and gMLP with timm's own exact GELU)."""
  m = info["model"]
  act = ", act_layer=functools.partial(torch.nn.GELU, approximate='tanh')"
  act = act if family == "mixer" else ""
  extra = f"num_classes={int(info.get('num_classes') or 0)}"
  if info.get("image_size"):
    extra += f", img_size={int(info['image_size'])}"
  name = timm_model_name(m, family)
  if name:
    return f"timm.create_model({name!r}, pretrained=False, {extra}{act})"
  if family == "mixer":
    ratio = (m["tokens_mlp_dim"] / m["hidden_dim"], m["channels_mlp_dim"] / m["hidden_dim"])
  else:
    ratio = m["channels_mlp_dim"] / m["hidden_dim"]
  layers = f", {_TIMM_LAYERS[family]}" if family in _TIMM_LAYERS else ""
  return (f"timm.models.mlp_mixer.MlpMixer({extra}, patch_size={m['patch_size']}, "
          f"num_blocks={m['num_blocks']}, embed_dim={m['hidden_dim']}, "
          f"mlp_ratio={ratio!r}{layers}{act})")


def _check_output(path: str, fmt: str, overwrite: bool) -> None:
  """Fails with one sentence (CheckpointError) unless `path` can be written as `fmt`."""
  if not path:
    raise errors.CheckpointError("--output is required; pass the file to write.")
  if os.path.isdir(path):
    raise errors.CheckpointError(f"Output {path} is a directory; pass a file name.")
  ext = os.path.splitext(path)[1].lower()
  other = next((f for f, e in EXTENSIONS.items() if e == ext and f != fmt), None)
  if other:
    raise errors.CheckpointError(
        f"Output {path} has the extension of --format={other}, not of --format={fmt}; name "
        f"it *{EXTENSIONS[fmt]} or pass --format={other}.")
  if os.path.exists(path) and not overwrite:
    raise errors.CheckpointError(
        f"Output {path} already exists; pass --overwrite to replace it, or choose another "
        "--output.")
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


def export(checkpoint_path: str, fmt: str, output: str, overwrite: bool = False
           ) -> Dict[str, Any]:
  """Writes `output` in `fmt` ('timm' or 'npz'); returns the checkpoint info.

  Everything is checked before anything is written: the format, the output name, and
  the checkpoint (a file must be a complete Mixer, see `weights.load_file`).
  """
  if fmt not in FORMATS:
    raise errors.CheckpointError(
        f"Unknown format {fmt!r}; use --format=timm or --format=npz.")
  _check_output(output, fmt, overwrite)
  params, info = weights.load_params(checkpoint_path)
  if not os.path.isfile(checkpoint_path):  # Files are checked as they are read.
    weights.check_params(params, checkpoint_path)
  if fmt == "npz":
    try:
      weights.save_npz(params, output)
    except OSError as e:
      raise errors.CheckpointError(
          f"Cannot write output {output} ({e.strerror or e}); choose a writable location.") from None
    return info
  from safetensors.numpy import save_file  # Only needed for this format.
  tensors = params_to_timm(params)
  family = weights.family_of(params).name
  info = dict(info, family=family)
  name = timm_model_name(info["model"], family)
  if name is None:
    logging.warning("No timm model name matches %s (e.g. H/14); exporting anyway; build it "
                    "with %s.", info["model"], timm_constructor(info, family))
  metadata = {"format": "pt", "timm_model": name or "",
              "num_classes": str(int(info.get("num_classes") or 0)),
              "image_size": str(info.get("image_size") or ""),
              "gelu": "tanh" if family == "mixer" else "erf"}
  if family != "resmlp":
    metadata["layer_norm_eps"] = "1e-6"
  tmp = f"{output}.tmp-{os.getpid()}"
  try:
    save_file(tensors, tmp, metadata=metadata)
    # safetensors creates its file private (0600); give it a normal file's mode, as the
    # .npz gets (0666 less the umask).
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, output)
  except Exception as e:  # OSError, or safetensors' own error on a full disk.
    raise errors.CheckpointError(
        f"Cannot write output {output} ({getattr(e, 'strerror', None) or e}); choose a "
        "writable location.") from None
  finally:
    if os.path.exists(tmp):  # No partial file left behind.
      os.remove(tmp)
  return info


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (only when run as a program, so that importing this
  module next to other CLIs' modules does not clash on flag names)."""
  flags.DEFINE_string("checkpoint", None,
                      "Released .npz, timm .safetensors, or training workdir / step dir.")
  flags.DEFINE_string("format", "timm", "Output format: 'timm' (safetensors) or 'npz'.")
  flags.DEFINE_string("output", None, "File to write (.safetensors for timm, .npz for npz).")
  flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


def main(argv):
  if len(argv) > 1:
    print(f"Unexpected arguments {argv[1:]}; use --checkpoint, --format, --output and --overwrite.",
          file=sys.stderr)
    sys.exit(2)
  if not FLAGS.checkpoint:
    print("--checkpoint is required; pass a .npz file or a training workdir.", file=sys.stderr)
    sys.exit(2)
  output = paths.resolve(FLAGS.output)
  errors.exit_on_ctrl_c(
      f"nothing written ({FLAGS.output} is written whole or not at all).",
      cleanup=lambda: output and os.path.exists(f"{output}.tmp-{os.getpid()}") and os.remove(
          f"{output}.tmp-{os.getpid()}"))
  try:
    info = export(paths.resolve(FLAGS.checkpoint), FLAGS.format, output, FLAGS.overwrite)
  except errors.CheckpointError as e:
    print(str(e), file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {FLAGS.output} ({FLAGS.format}).")
  if FLAGS.format == "timm":
    print(f"Load it with: model = {timm_constructor(info, info.get('family', 'mixer'))}; "
          "model.load_state_dict(safetensors.torch.load_file(path), strict=True)")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
