"""Weight files people exchange: released `.npz`, timm `.safetensors`, and the merge
of pre-trained weights into a fresh model.

A released file (e.g. `gs://mixer_models/imagenet1k/Mixer-B_16.npz`) is a NumPy
archive whose keys are the Flax parameter paths joined by `/`
(`MixerBlock_0/token_mixing/Dense_0/kernel`, ...). `load_npz` / `save_npz` convert
between that layout and the nested parameter dict, losslessly, so files written here
stay readable by the public tools that read the released ones. A `.safetensors` file
in timm's layout of a Mixer, ResMLP or gMLP (timm's published weights, or what
`export --format=timm` writes) is read through `timm_layout.timm_to_params`, bit for
bit. The other families' trees are written to `.npz` the same way (their own keys).

`load_file` checks a file against the model that its blocks' names (the family),
stem and first block describe (`describe`): every key, shape and dtype, so a missing,
stray or misshapen parameter is one sentence naming the file and the key, before
anything is compiled. The expected shapes are `jax.eval_shape` of that model's init:
a module definition and a shape trace, nothing allocated, compiled or placed on a
device. A table of shapes per family would say the model's structure a second time
(and drift from it); the module is the one statement of which parameters exist.

`load_pretrained` merges such parameters into a freshly initialised model, checking
every key and shape up front, re-initialising the head when the class count differs
and building the block-diagonal token-mixing initialisation for higher resolutions
(paper Appendix C, see `resolution.py`); `init_state` is train.py's one call for it.

`load_params` is the one reader for evaluate, predict and export: a file, or the
newest readable step of a training workdir (`checkpoint.read_params`). It lives here,
not in checkpoint.py, because every source ends in the same thing, parameters in the
released layout with the model they describe, and only the workdir case is orbax's.

Block layouts (models/blocks.py): the released, unrolled layout (`MixerBlock_<i>`) is
the one in files and the one this module hands out; `save_npz` writes it whatever the
model's layout, and `load_pretrained` merges into a scanned model (blocks stacked under
`MixerBlock`) as into an unrolled one.
"""

import math
import os
import re
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util

from mixer_jax import checkpoint
from mixer_jax import errors
from mixer_jax import hub
from mixer_jax import models
from mixer_jax import resolution
from mixer_jax import run_record
from mixer_jax import timm_layout

_PASS = ("pass a released .npz, a .safetensors file written by mixer_jax.export, or a "
         "training workdir")
_TITLES = timm_layout.TITLES  # "mixer" -> "Mixer", ...


def _own_size(family: str) -> str:
  """What a file is checked against when no config says what it should be."""
  return f"the {_TITLES[family]} that its stem and first block describe"


def flatten(params: Mapping[str, Any]) -> Dict[str, Any]:
  return traverse_util.flatten_dict(dict(params), sep="/")


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def released(tree):
  """`tree` (parameters, or any tree holding them) in the released, unrolled layout;
  an unrolled tree (or one without blocks) is returned as it is."""
  return models.to_unrolled(tree) if models.layout_or_none(tree) == models.SCANNED else tree


def _is_safetensors(path: str) -> bool:
  """A safetensors file starts with its JSON header's length (8 bytes LE) and '{'."""
  with open(path, "rb") as f:
    head = f.read(9)
  return (len(head) == 9 and head[8:] == b"{" and
          0 < int.from_bytes(head[:8], "little") < os.path.getsize(path))


def load_npz(path: str) -> Dict[str, Any]:
  """Reads a released-layout `.npz` into a nested dict of numpy arrays (as stored)."""
  if not os.path.exists(path):
    raise errors.CheckpointError(f"Checkpoint file {path} does not exist; check the path.")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      is_zip = f.read(2) == b"PK"  # A truncated zip has lost its directory at the end.
    if not is_zip:
      raise errors.CheckpointError(
          f"{path} is not a readable .npz checkpoint (it is not a zip archive); {_PASS}.")
  else:
    with zipfile.ZipFile(path) as z:
      stray = [n for n in z.namelist() if not n.endswith(".npy")]
    if stray:
      raise errors.CheckpointError(
          f"{path} is not a readable .npz checkpoint (a zip archive holding {stray[0]}, "
          f"not NumPy arrays); {_PASS}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise errors.CheckpointError(
        f"{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}); it may be "
        "truncated or not a checkpoint, so download or write it again.") from None
  if not flat:
    raise errors.CheckpointError(f"{path} holds no arrays; it is not a Mixer checkpoint.")
  return from_big_vision_layout(unflatten({k: _widened(v) for k, v in flat.items()}))


def _widened(array: np.ndarray) -> np.ndarray:
  """bfloat16 and float16 arrays as float32 (exactly: every such value is a float32).

  NumPy stores bfloat16 as the 2-byte void type |V2 (it has no bfloat16 of its own);
  big_vision reads it back as ml_dtypes' bfloat16, and so does this. The model's
  parameters are float32; a config's `dtype` chooses the compute precision.
  """
  if array.dtype == np.dtype("V2"):
    array = array.view(ml_dtypes.bfloat16)
  if array.dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
    return array.astype(np.float32)
  return array


def _linen_numbering(tree):
  """flax's `convert_pre_linen` (pre-linen numbered submodules of all kinds with one
  counter: `LayerNorm_0`, `LayerNorm_2`; linen counts per kind), written here because
  flax.training.checkpoints imports TensorFlow, which the GPU images lack."""
  if not isinstance(tree, Mapping):
    return tree
  counts, out = {}, {}
  for name in sorted(tree, key=lambda k: [int(t) if t.isdigit() else t
                                          for t in re.split(r"(\d+)", str(k))]):
    match = re.fullmatch(r"(.*)_(\d+)", str(name))
    key = name
    if match:
      key = f"{match.group(1)}_{counts.get(match.group(1), 0)}"
      counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    out[key] = _linen_numbering(tree[name])
  return out


def from_big_vision_layout(tree: Dict[str, Any]) -> Dict[str, Any]:
  """The released layout of a Mixer file in big_vision's second layout (the pre-linen
  one its `mlp_mixer.load` also accepts), else `tree` as it is.

  That layout names the stem `embedding`, the blocks `Mixer/encoderblock_<i>` with
  `token_mixing_phase_0` / `channel_mixing_phase_0` MLPs of `kernel1, bias1, kernel2,
  bias2` (possibly with singleton axes), and the final norm `Mixer/encoder_norm`.
  Submodule numbers are made linen's as flax's `convert_pre_linen` does; the result
  is then checked key by key like any released file.
  """
  mixer = tree.get("Mixer")
  if not isinstance(mixer, Mapping) or not any(str(k).startswith("encoderblock_") for k in mixer):
    return tree
  tree = _linen_numbering(tree)
  mixer = dict(tree.pop("Mixer"))

  def mlp(d):
    return {f"Dense_{i}": {"kernel": np.squeeze(d[f"kernel{i + 1}"]),
                           "bias": np.squeeze(d[f"bias{i + 1}"])} for i in (0, 1)}

  out, rest = dict(tree), {}
  if "embedding" in out:
    out["stem"] = out.pop("embedding")
  if "encoder_norm" in mixer:
    out["pre_head_layer_norm"] = mixer.pop("encoder_norm")
  for name, block in mixer.items():
    if not str(name).startswith("encoderblock_"):
      rest[name] = block  # Left for the key-by-key check to name.
      continue
    block = dict(block)
    for phase, ours in (("token_mixing_phase_0", "token_mixing"),
                        ("channel_mixing_phase_0", "channel_mixing")):
      if phase in block:
        block[ours] = mlp(block.pop(phase))
    out[f"MixerBlock_{name[len('encoderblock_'):]}"] = block
  if rest:
    out["Mixer"] = rest
  return out


def save_npz(params: Mapping[str, Any], path: str) -> None:
  """Writes params in the released layout (a scanned tree unstacked), atomically
  (temp file, then rename)."""
  flat = {k: np.asarray(v) for k, v in flatten(released(params)).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):  # A failed write leaves no partial file behind.
      os.remove(tmp)


def load_safetensors(path: str) -> Dict[str, Any]:
  """Reads a timm-layout `.safetensors` of a Mixer, ResMLP or gMLP (timm's weights, or
  export --format=timm) into our nested params, checked complete (`check_complete`,
  every key, shape and dtype in timm's names and shapes)."""
  from safetensors.numpy import load_file as read_safetensors
  try:
    state_dict = read_safetensors(path)
  except Exception as e:  # SafetensorError, or a dtype numpy lacks (bfloat16).
    raise errors.CheckpointError(
        f"{path} is not a readable .safetensors file ({errors.short(e)}); it may be truncated, "
        "so export or download it again.") from None
  if not state_dict:
    raise errors.CheckpointError(f"{path} holds no arrays; it is not a Mixer checkpoint.")
  params = timm_layout.timm_to_params(state_dict, source=path)
  family = family_of(params).name
  expected = expected_shapes(describe(params, source=path), source=path, family=family)
  names = timm_layout.key_map(expected, family)
  check_complete(state_dict, {names[k]: timm_layout.timm_shape(k, s)
                              for k, s in expected.items()}, path, family)
  return params


def load_file(path: str) -> Dict[str, Any]:
  """A released-layout `.npz` or a timm-layout `.safetensors`, as nested numpy params,
  checked against the Mixer its stem and first block describe (see module doc)."""
  if not os.path.exists(path):
    raise errors.CheckpointError(f"Checkpoint file {path} does not exist; check the path.")
  if _is_safetensors(path):
    return load_safetensors(path)
  params = load_npz(path)
  try:
    params = released(params)  # A file of stacked blocks (np.savez of a scanned model).
  except ValueError as e:
    raise errors.CheckpointError(f"{path} holds stacked blocks that do not unstack ({e})"
                                 f"; {_PASS}.") from None
  check_params(params, path)
  return params


def check_params(params: Mapping[str, Any], source: str) -> None:
  """`check_complete` of a parameter tree against the model it describes."""
  family = family_of(params).name
  expected = expected_shapes(describe(params, source=source), source=source, family=family)
  check_complete(flatten(params), expected, source, family)


def family_of(params: Mapping[str, Any]) -> "models.Family":
  """The registered family whose blocks (`MixerBlock_<i>`, `ResMlpBlock_<i>`,
  `GMlpBlock_<i>`) the tree holds; the Mixer's when it holds none (the checks then
  name what a Mixer lacks)."""
  flat = flatten(params) if isinstance(params, Mapping) else params
  for fam in models.families():
    block = re.compile(rf"{re.escape(fam.block_name)}_\d+/")
    if any(block.match(k) for k in flat):
      return fam
  return models.family_named("mixer")


def describe(params: Mapping[str, Any], source: str = "The parameter tree") -> Dict[str, Any]:
  """Infers the architecture's size fields stored in a parameter tree (of its family,
  `family_of`), plus num_tokens and num_classes.

  num_blocks counts up to the highest block index, so a missing middle block shows
  up as missing keys in `check_complete`.
  """
  flat = flatten(params)
  fam = family_of(flat)
  title = _TITLES[fam.name]
  for key, _ in fam.shape_keys.values():
    if key not in flat:
      raise errors.CheckpointError(
          f"{source} is not a {title} checkpoint (it has no parameter {key}); {_PASS}.")
  ranks = {key: 4 if key == "stem/kernel" else 2 for key, _ in fam.shape_keys.values()}
  for key, rank in list(ranks.items()) + [("head/kernel", 2)]:
    if key in flat and np.ndim(flat[key]) != rank:
      raise errors.CheckpointError(
          f"{source} parameter {key} has shape {tuple(np.shape(flat[key]))}, not the "
          f"{rank}-D shape of a {title}'s; {_PASS}.")
  sizes = {name: int(np.shape(flat[key])[axis]) for name, (key, axis) in fam.shape_keys.items()}
  block = re.compile(rf"{re.escape(fam.block_name)}_(\d+)/")
  blocks = [int(m.group(1)) for m in map(block.match, flat) if m]
  desc = dict(patch_size=sizes["patch_size"], hidden_dim=sizes["hidden_dim"],
              num_blocks=max(blocks) + 1)
  desc.update({k: v for k, v in sizes.items() if k not in desc})
  desc["num_classes"] = int(np.shape(flat["head/kernel"])[-1]) if "head/kernel" in flat else 0
  return desc


def size_fields(desc: Mapping[str, int]) -> Dict[str, int]:
  """The `create_model` size fields of a `describe` result (num_tokens and num_classes
  left out)."""
  return {k: int(v) for k, v in desc.items() if k not in ("num_tokens", "num_classes")}


def expected_shapes(desc: Mapping[str, int], source: str = "The checkpoint",
                    family: str = "mixer") -> Dict[str, Tuple[int, ...]]:
  """Flat parameter shapes of the model of `family` that `describe` found:
  `jax.eval_shape` of its init (nothing allocated or compiled, no device started).
  The model is `state.inference_model`'s for a file (the family's variant, every size
  given); the input is one row of num_tokens patches, so any token count works."""
  fields = size_fields(desc)
  try:
    model = models.create_model(family, desc["num_classes"], **fields)
  except (ValueError, TypeError) as e:
    raise errors.CheckpointError(
        f"{source} describes no valid {_TITLES[family]} ({e}); {_PASS}.") from None
  p = desc["patch_size"]
  images = jax.ShapeDtypeStruct((1, p, p * desc["num_tokens"], 3), jnp.float32)
  tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return {k: tuple(v.shape) for k, v in flatten(tree["params"]).items()}


def check_complete(found: Mapping[str, Any], expected: Mapping[str, Tuple[int, ...]],
                   path: str, family: str = "mixer") -> None:
  """Every expected key present with its shape and a floating dtype, nothing else;
  otherwise one sentence naming `path` and the first offending key (sorted order)."""
  own = _own_size(family)
  for key in sorted(set(found) | set(expected)):
    if key not in found:
      raise errors.CheckpointError(
          f"{path} is missing parameter {key} (shape {expected[key]} in {own}); "
          "the file is incomplete, so export or download it again.")
    shape = tuple(np.shape(found[key]))
    if key not in expected:
      raise errors.CheckpointError(
          f"{path} has parameter {key} (shape {shape}) that is not in {own}; remove "
          "it, or export or download the file again.")
    if shape != tuple(expected[key]):
      raise errors.CheckpointError(
          f"{path} parameter {key} has shape {shape} but {own} expects "
          f"{tuple(expected[key])}; the file is inconsistent, so export or download it again.")
    if not np.issubdtype(np.asarray(found[key]).dtype, np.floating):
      raise errors.CheckpointError(
          f"{path} parameter {key} has dtype {np.asarray(found[key]).dtype}, not a "
          "floating-point type; save the weights as float32 arrays and try again.")


def _check_same_variant(init_flat, pre_flat, source: str) -> None:
  """A checkpoint of another family or other sizes than the model: one sentence naming
  both and the first key that differs. Run before the token-count expansion, so
  tokens_mlp_dim only counts at the same token count (it grows K^2-fold for higher
  resolutions)."""
  try:
    have, want = describe(unflatten(pre_flat)), describe(unflatten(init_flat))
  except errors.CheckpointError:
    return  # Not both complete models: the key-by-key check names the problem.
  have_family, want_family = family_of(pre_flat).name, family_of(init_flat).name
  if have_family != want_family:
    raise errors.CheckpointError(
        f"{source} is a {_TITLES[have_family]} but the config asks for a "
        f"{_TITLES[want_family]}; set config.model.variant to a {_TITLES[have_family]} "
        "variant (or '' to take the checkpoint's), or pass a checkpoint of the config's "
        "family.")
  fields = [k for k in size_fields(want) if have[k] != want[k] and
            (k != "tokens_mlp_dim" or have["num_tokens"] == want["num_tokens"])]
  if not fields:
    return
  shape = lambda flat, k: tuple(np.shape(flat[k])) if k in flat else None
  key = next(k for k in sorted(set(init_flat) | set(pre_flat))
             if not k.startswith("head/") and shape(init_flat, k) != shape(pre_flat, k))
  if key not in pre_flat:
    detail = f"it lacks {key}, shape {shape(init_flat, key)} in the model"
  elif key not in init_flat:
    detail = f"it has {key}, shape {shape(pre_flat, key)}, that the model lacks"
  else:
    detail = (f"{key} has shape {shape(pre_flat, key)} but the model expects "
              f"{shape(init_flat, key)}")
  raise errors.CheckpointError(
      f"{source} is a {_TITLES[have_family]} with "
      f"{', '.join(f'{k} {have[k]}' for k in fields)} but the "
      f"config asks for {', '.join(f'{k} {want[k]}' for k in fields)} ({detail}); set "
      "config.model.variant and sizes to the file's, or pass a checkpoint of the config's "
      "variant.")


def load_pretrained(init_params: Mapping[str, Any], pretrained: Mapping[str, Any],
                    *, source: str = "checkpoint", quiet: bool = False) -> Dict[str, Any]:
  """Merges `pretrained` into `init_params` (a freshly initialised model's params).

  Either tree may be in either block layout: both are compared and merged key by key
  in the released, unrolled one (so messages name `MixerBlock_<i>` keys), and the
  result is in `init_params`'s layout.

  - `head/*`: kept from `init_params` (re-initialised, zeros) when the class count
    differs or the model has no head (features model) or the checkpoint has none.
  - token-mixing kernels whose token count differs by an integer K^2: block-diagonal
    high-resolution initialisation (`resolution.expand_token_mixing`).
  - a checkpoint of other Mixer sizes (another variant) raises `errors.CheckpointError`
    naming both sizes and the first differing key; anything else missing, unexpected
    or differently shaped names the key and both shapes, before anything runs.
  """
  target = models.layout_or_none(init_params)
  init_flat, pre_flat = flatten(released(init_params)), flatten(released(pretrained))
  _check_same_variant(init_flat, pre_flat, source)
  pre_flat = resolution.expand_if_needed(init_flat, pre_flat, source=source)
  merged, reinit = {}, []
  for key, init_value in init_flat.items():
    is_head = key.startswith("head/")
    if key not in pre_flat:
      if is_head:
        if not quiet:
          logging.info("%s has no %s; keeping the fresh head.", source, key)
        merged[key] = init_value
        continue
      raise errors.CheckpointError(f"{source} is missing parameter {key} (model expects shape "
                            f"{tuple(init_value.shape)}); it is not a checkpoint of this model.")
    value = pre_flat[key]
    if tuple(value.shape) != tuple(init_value.shape):
      if is_head:
        reinit.append(f"{key} {tuple(value.shape)} -> {tuple(init_value.shape)}")
        merged[key] = init_value
        continue
      raise errors.CheckpointError(
          f"{source} parameter {key} has shape {tuple(value.shape)} but the model expects "
          f"{tuple(init_value.shape)}; use the variant and image size it was trained with.")
    merged[key] = np.asarray(value, dtype=init_value.dtype if hasattr(init_value, "dtype")
                             else np.asarray(init_value).dtype)
  unexpected = sorted(k for k in pre_flat if k not in init_flat and not k.startswith("head/"))
  if unexpected:
    raise errors.CheckpointError(f"{source} has parameter {unexpected[0]} (shape "
                          f"{tuple(pre_flat[unexpected[0]].shape)}) that the model lacks "
                          f"({len(unexpected)} unexpected in all); check the variant.")
  if reinit and not quiet:
    logging.info("Re-initialising the head (checkpoint shape -> model shape): %s.",
                 ", ".join(reinit))
  merged = unflatten(merged)
  return models.to_scanned(merged) if target == models.SCANNED else merged



def init_state(setup, pretrained: Optional[Mapping[str, Any]], source: str):
  """A fresh train state of `setup` (state.Setup), with `pretrained` (load_params'
  parameters) merged in when given: train.py's init_from, in one call.

  The merge runs once, against the parameters' shapes, before the initialisation is
  compiled, so every key and shape is checked first and the head re-initialisation
  and Appendix C expansion are logged once; the leaves the merge keeps fresh (a
  re-initialised head) then take the initialiser's values (zeros kernel,
  head_bias_init bias).
  """
  if pretrained is None:
    return setup.init_state()
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                  setup.abstract_state["params"])
  merged = load_pretrained(shapes, pretrained, source=source)
  fresh = jax.device_get(setup.init_state()["params"])
  params = jax.tree_util.tree_map(
      lambda m, f: f if isinstance(m, jax.ShapeDtypeStruct) else m, merged, fresh)
  return setup.state_with_params(params)


def load_params(path: str):
  """Parameters and model info from a released `.npz`, a timm `.safetensors` (both
  checked complete, see `load_file`), an `hf-hub:` name (hub.py: the repository's
  timm `.safetensors`), a workdir or a step dir.

  Returns (params as nested numpy dict in the released, unrolled layout, also for a
  scanned model's workdir, info) with info keys `model` (create_model
  size fields), `num_classes`, `class_names` (list or None), `image_size` (or None),
  `family` and `variant` (the model's name, `models.model_name`; a workdir's as
  recorded).
  """
  if hub.is_hub_name(path):  # hf-hub:ORG/REPO[@REVISION]: its model.safetensors, cached.
    try:
      path = hub.download(path)
    except ValueError as e:
      raise errors.CheckpointError(str(e)) from None
  if os.path.isfile(path):
    params = load_file(path)
    desc = describe(params)
    side = int(round(math.sqrt(desc["num_tokens"])))
    info = dict(model=size_fields(desc),
                num_classes=desc["num_classes"], class_names=None,
                image_size=side * desc["patch_size"] if side * side == desc["num_tokens"] else None)
    info["family"] = family = family_of(params).name
    info["variant"] = models.model_name(family, info["model"])
    return params, info
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"Checkpoint {path} does not exist; pass a .npz or .safetensors "
                          "file, a training workdir or one of its checkpoints/<step> "
                          "directories.")
  workdir, step = path, None
  if run_record.read_model_file(path) is None:
    parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(os.path.abspath(path)).isdigit() and run_record.read_model_file(parent):
      workdir, step = parent, int(os.path.basename(os.path.abspath(path)))
    else:
      raise errors.CheckpointError(f"{path} is neither a .npz checkpoint nor a workdir of this "
                            f"codebase (no {run_record.MODEL_FILE}); pass a .npz or .safetensors "
                            "file or a workdir.")
  model_info = run_record.read_model_file(workdir)
  # A scanned run's checkpoints hold its stacked blocks: released here, on the host.
  params = released(checkpoint.read_params(workdir, step))
  info = dict(model=model_info["model"], num_classes=model_info["num_classes"],
              class_names=model_info.get("class_names"),
              image_size=model_info.get("image_size"))
  for key in ("family", "variant"):  # The family and the run's name, where recorded.
    if model_info.get(key):
      info[key] = model_info[key]
  return params, info
