"""Training checkpoints (orbax) of a workdir, and reading a step's parameters back.

WORKDIR/
  model.json            model fields, classes, image size (what the checkpoints are of)
  checkpoints/<step>/   orbax items `params`, `opt_state`, `meta`

No input state is saved: the training stream's position is the step itself
(input_pipeline.py). Orbax finalises a step directory atomically (temp dir, then
rename), so a step that orbax lists is complete; a restart that finds an unreadable
one sets it aside (`WORKDIR/unreadable_checkpoints/`) and falls back to the previous.

Block layout: a checkpoint keeps the run's own (a scanned model's blocks stacked
under `MixerBlock`), so a save writes the state as the step left it: no conversion
program and no second copy of the state on every save of a long run. Layouts are
converted (`models.to_layout`) only where they meet: a resume whose `model.scan`
changed converts once, and the readers of `read_params` (weights.load_params) convert
to the released layout on the host; that layout is for files people exchange.
"""

import json
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mixer_jax import errors
from mixer_jax import models

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


def saved_steps(workdir: str):
  """The training checkpoints' steps in a workdir (none: []), without opening them."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_params(workdir: str, step: Optional[int] = None):
  """The parameters (numpy, in the layout stored) of a workdir's newest readable step,
  or of `step`; read via this process's first device, so from any topology."""
  from etils import epath
  import orbax.checkpoint as ocp
  directory, unreadable = os.path.join(workdir, CHECKPOINT_DIR), []
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for step in reversed(saved_steps(workdir) if step is None else [step]):
    try:
      # The item's own handler: `params` is one item of a step saved by the
      # CheckpointManager, whose step metadata sits one level up (a StandardCheckpointer
      # pointed at the item would warn that its own metadata file is missing).
      handler = ocp.StandardCheckpointHandler()
      params_dir = epath.Path(os.path.join(directory, str(step), "params"))
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          handler.metadata(params_dir))
      restored = handler.restore(params_dir, args=ocp.args.StandardRestore(target))
      return jax.tree_util.tree_map(np.asarray, restored)
    except Exception as e:  # A truncated or corrupted step: try the previous one.
      logging.warning("Checkpoint step %d in %s is unreadable (%s); trying an earlier one.",
                      step, directory, e)
      unreadable.append(step)
  raise errors.CheckpointError(
      f"{workdir} holds no readable checkpoint (tried steps {unreadable}); train first or "
      "pass another path.")


def _layout(tree) -> Optional[str]:
  try:
    return models.layout(tree)
  except ValueError:  # No blocks (nothing to convert).
    return None


class TrainCheckpoints:
  """Orbax train-state checkpoints of a workdir, in the run's own block layout.

  `shardings`: the run's rules, a function of a shape-only train state (or part of
  one) in either layout -> its shardings (`state.Setup.shardings`). Needed only for a
  resume whose block layout is not the files' (`model.scan` changed).
  """

  def __init__(self, workdir: str, keep: int,
               shardings: Optional[Callable[[Any], Any]] = None):
    import orbax.checkpoint as ocp
    self._ocp, self._shardings = ocp, shardings
    self.dir = os.path.join(workdir, CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        # A save killed half-way leaves a temp dir; clear it so the step can be redone.
        cleanup_tmp_directories=True),
        # Known up front, so a step's item metadata (its layout) reads before a restore.
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

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
    """Newest readable step (falling back past unreadable ones, which are set aside),
    or None; in the layout and with the shardings of `abstract_state`."""
    wanted = {"params": abstract_state["params"], "opt_state": abstract_state["opt_state"]}
    layout, unreadable = _layout(wanted), []
    try:
      for step in sorted(self.manager.all_steps(), reverse=True):
        try:
          metadata = self.manager.item_metadata(step)["params"]
          stored = _layout(getattr(metadata, "tree", metadata))
          target = wanted if stored in (None, layout) else self._target(wanted, stored)
          restored = self.manager.restore(step, args=self._ocp.args.Composite(
              params=self._ocp.args.StandardRestore(target["params"]),
              opt_state=self._ocp.args.StandardRestore(target["opt_state"]),
              meta=self._ocp.args.JsonRestore()))
        except Exception as e:  # Truncated or corrupted files: use the previous step.
          logging.error("Checkpoint step %d in %s is unreadable (%s); falling back to the "
                        "previous one.", step, self.dir, _short(e))
          unreadable.append(step)
          continue
        trees = {"params": restored["params"], "opt_state": restored["opt_state"]}
        if target is not wanted:  # One program, on the global arrays, no host transfer.
          trees = jax.jit(lambda t: models.to_layout(t, layout), out_shardings=jax.tree_util
                          .tree_map(lambda a: a.sharding, wanted))(trees)
          logging.info("Step %d of %s is in the %s layout, the model's %s: converted.",
                        step, self.dir, stored, layout)
        logging.info("Resumed from step %d of %s.", step, self.dir)
        return {"step": jnp.asarray(restored["meta"]["step"], jnp.int32), **trees}
      return None
    finally:
      self._set_aside(unreadable)

  def _target(self, wanted, stored: str):
    """`wanted` as shapes in the `stored` layout, with the run's shardings of those."""
    if self._shardings is None:
      raise ValueError("TrainCheckpoints restores another block layout here and needs the "
                       "run's `shardings` (state.Setup.shardings).")
    shapes = models.to_layout(jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), wanted), stored)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  shapes, self._shardings(shapes))

  def _set_aside(self, steps):
    """Moves unreadable steps aside (kept, never deleted) so they can be saved again."""
    if not steps:
      return
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mixer_set_aside_unreadable_checkpoints")
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.dir), "unreadable_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        os.replace(os.path.join(self.dir, str(step)), target)
        logging.error("Moved unreadable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mixer_set_aside_done")
    self.manager.reload()

  def close(self):
    self.manager.close()


def _short(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
