"""Released-checkpoint I/O: the `.npz` layout of Google's Mixer models.

A released file (e.g. `gs://mixer_models/imagenet1k/Mixer-B_16.npz`) is a NumPy
archive whose keys are the Flax parameter paths joined by `/`
(`MixerBlock_0/token_mixing/Dense_0/kernel`, ...). `load_npz` / `save_npz` convert
between that layout and the nested parameter dict, losslessly, so files written here
stay readable by the public tools that read the released ones.

`load_pretrained` merges such parameters into a freshly initialised model, checking
every key and shape up front (before anything is compiled), re-initialising the head
when the class count differs and building the block-diagonal token-mixing
initialisation for higher resolutions (paper Appendix C, see `resolution.py`).
"""

import json
import math
import os
import time
import zipfile
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from mixer_jax import errors
from mixer_jax import resolution


def flatten(params: Mapping[str, Any]) -> Dict[str, Any]:
  return traverse_util.flatten_dict(dict(params), sep="/")


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def load_npz(path: str) -> Dict[str, Any]:
  """Reads a released-layout `.npz` into a nested dict of float32 numpy arrays."""
  if not os.path.exists(path):
    raise errors.CheckpointError(f"Checkpoint file {path} does not exist; check the path.")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise errors.CheckpointError(
        f"{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}); it may be "
        "truncated or not a checkpoint, so download or write it again.") from None
  if not flat:
    raise errors.CheckpointError(f"{path} holds no arrays; it is not a Mixer checkpoint.")
  return unflatten(flat)


def save_npz(params: Mapping[str, Any], path: str) -> None:
  """Writes params in the released layout, atomically (temp file, then rename)."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **flat)
  os.replace(tmp, path)


def describe(params: Mapping[str, Any]) -> Dict[str, Any]:
  """Infers the Mixer architecture fields stored in a parameter tree."""
  flat = flatten(params)
  try:
    stem = flat["stem/kernel"]
    blocks = sorted({int(k.split("/")[0].split("_")[1]) for k in flat
                     if k.startswith("MixerBlock_")})
    return dict(
        patch_size=int(stem.shape[0]),
        hidden_dim=int(stem.shape[-1]),
        num_blocks=len(blocks),
        num_tokens=int(flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[0]),
        tokens_mlp_dim=int(flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[1]),
        channels_mlp_dim=int(flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[1]),
        num_classes=int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else 0,
    )
  except (KeyError, IndexError, ValueError) as e:
    raise errors.CheckpointError(f"Not a Mixer parameter tree (missing {e}).") from None


def load_pretrained(init_params: Mapping[str, Any], pretrained: Mapping[str, Any],
                    *, source: str = "checkpoint") -> Dict[str, Any]:
  """Merges `pretrained` into `init_params` (a freshly initialised model's params).

  - `head/*`: kept from `init_params` (re-initialised, zeros) when the class count
    differs or the model has no head (features model) or the checkpoint has none.
  - token-mixing kernels whose token count differs by an integer K^2: block-diagonal
    high-resolution initialisation (`resolution.expand_token_mixing`).
  - anything else missing, unexpected or differently shaped raises `errors.CheckpointError`
    naming the key and both shapes, before anything runs.
  """
  init_flat, pre_flat = flatten(init_params), flatten(pretrained)
  pre_flat = resolution.expand_if_needed(init_flat, pre_flat, source=source)
  merged = {}
  for key, init_value in init_flat.items():
    is_head = key.startswith("head/")
    if key not in pre_flat:
      if is_head:
        logging.info("%s has no %s; keeping the fresh head.", source, key)
        merged[key] = init_value
        continue
      raise errors.CheckpointError(f"{source} is missing parameter {key} (model expects shape "
                            f"{tuple(init_value.shape)}); it is not a checkpoint of this model.")
    value = pre_flat[key]
    if tuple(value.shape) != tuple(init_value.shape):
      if is_head:
        logging.info("Re-initialising %s: checkpoint shape %s, model shape %s.", key,
                     tuple(value.shape), tuple(init_value.shape))
        merged[key] = init_value
        continue
      raise errors.CheckpointError(
          f"{source} parameter {key} has shape {tuple(value.shape)} but the model expects "
          f"{tuple(init_value.shape)}; use the variant and image size it was trained with.")
    merged[key] = np.asarray(value, dtype=np.asarray(init_value).dtype)
  unexpected = sorted(k for k in pre_flat if k not in init_flat and not k.startswith("head/"))
  if unexpected:
    raise errors.CheckpointError(f"{source} has parameter {unexpected[0]} (shape "
                          f"{tuple(pre_flat[unexpected[0]].shape)}) that the model lacks "
                          f"({len(unexpected)} unexpected in all); check the variant.")
  return unflatten(merged)


# ------------------------------------------------------------------------------
# Training checkpoints of this codebase (orbax), and reading any checkpoint.
#
# WORKDIR/
#   model.json                    model fields, classes, image size
#   checkpoints/<step>/           orbax: items `params`, `opt_state`, `meta`
#
# No input state is saved: the training stream's position is the step itself
# (input_pipeline.py). Orbax finalises a step directory atomically (temp dir, then
# rename), so a step that orbax lists is complete; a restart that finds an unreadable
# one falls back to the previous step.

MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"


def read_model_file(workdir: str):
  path = os.path.join(workdir, MODEL_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_model_file(workdir: str, info: Mapping[str, Any]) -> None:
  path = os.path.join(workdir, MODEL_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _orbax_steps(checkpoint_dir: str):
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


def _restore_params_only(checkpoint_dir: str, step: int):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(
      read_only=True)) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return _to_numpy_tree(restored["params"])


def _to_numpy_tree(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def load_params(path: str):
  """Parameters and model info from a released `.npz`, a workdir or a step dir.

  Returns (params as nested numpy dict, info) with info keys `model` (create_model
  size fields), `num_classes`, `class_names` (list or None), `image_size` (or None).
  """
  if os.path.isfile(path):
    params = load_npz(path)
    desc = describe(params)
    side = int(round(math.sqrt(desc["num_tokens"])))
    info = dict(model={k: desc[k] for k in ("patch_size", "num_blocks", "hidden_dim",
                                             "tokens_mlp_dim", "channels_mlp_dim")},
                num_classes=desc["num_classes"], class_names=None,
                image_size=side * desc["patch_size"] if side * side == desc["num_tokens"] else None)
    return params, info
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"Checkpoint {path} does not exist; pass a .npz file, a training "
                          "workdir or one of its checkpoints/<step> directories.")
  workdir, step = path, None
  if read_model_file(path) is None:
    parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(os.path.abspath(path)).isdigit() and read_model_file(parent):
      workdir, step = parent, int(os.path.basename(os.path.abspath(path)))
    else:
      raise errors.CheckpointError(f"{path} is neither a .npz checkpoint nor a workdir of this "
                            f"codebase (no {MODEL_FILE}); pass a .npz file or a workdir.")
  model_info = read_model_file(workdir)
  checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
  steps = _orbax_steps(checkpoint_dir) if step is None else [step]
  unreadable = []
  for s in reversed(steps):
    try:
      params = _restore_params_only(checkpoint_dir, s)
      break
    except Exception as e:  # A truncated or corrupted step: try the previous one.
      logging.warning("Checkpoint step %d in %s is unreadable (%s); trying an earlier one.",
                      s, checkpoint_dir, e)
      unreadable.append(s)
  else:
    raise errors.CheckpointError(f"{workdir} holds no readable checkpoint (tried steps {unreadable}); "
                          "train first or pass another path.")
  info = dict(model=model_info["model"], num_classes=model_info["num_classes"],
              class_names=model_info.get("class_names"),
              image_size=model_info.get("image_size"))
  return params, info


class TrainCheckpoints:
  """Orbax train-state checkpoints of a workdir (the input position is the step)."""

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.join(workdir, CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        # A save killed half-way leaves a temp dir; clear it so the step can be redone.
        cleanup_tmp_directories=True))

  def save(self, step: int, state) -> None:
    ocp = self._ocp
    try:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state["params"]),
          opt_state=ocp.args.StandardSave(state["opt_state"]),
          meta=ocp.args.JsonSave({"step": step})), force=True)
      self.manager.wait_until_finished()
    except Exception as e:  # Disk full, permissions, a vanished mount...
      previous = [s for s in self.manager.all_steps() if s != step]
      kept = f"step {max(previous)} is intact" if previous else "no earlier checkpoint exists"
      raise errors.WorkdirError(
          f"Saving checkpoint step {step} in {self.dir} failed ({_short(e)}); {kept}, so "
          "free disk space (or fix the path) and rerun the same command to resume.") from e

  def restore_latest(self, abstract_state) -> Optional[Dict[str, Any]]:
    """Newest readable step (falling back past unreadable ones), or None."""
    unreadable = []
    try:
      return self._restore_newest_readable(abstract_state, unreadable)
    finally:
      self._set_aside(unreadable)

  def _set_aside(self, steps):
    """Moves unreadable steps out of the way (kept for inspection, never deleted), so
    the resumed run can save those steps again."""
    if not steps:
      return
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mixer_set_aside_unreadable_checkpoints")
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.dir), "unreadable_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        os.replace(os.path.join(self.dir, str(step)), target)
        logging.error("Moved unreadable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mixer_set_aside_done")
    self.manager.reload()

  def _restore_newest_readable(self, abstract_state, unreadable):
    ocp = self._ocp
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # Truncated or corrupted files: use the previous step.
        logging.error("Checkpoint step %d in %s is unreadable (%s); falling back to the "
                      "previous one.", step, self.dir, _short(e))
        unreadable.append(step)
        continue
      state = {"step": jnp.asarray(restored["meta"]["step"], jnp.int32),
               "params": restored["params"], "opt_state": restored["opt_state"]}
      logging.info("Resumed from step %d of %s.", step, self.dir)
      return state
    return None

  def close(self):
    self.manager.close()


def _short(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
