"""Training checkpoints (orbax) of a workdir, and reading a step's parameters back.

WORKDIR/checkpoints/<step>/ holds the orbax items `params`, `opt_state` and `meta` (the
step and the run's flat config). No input state is saved: the stream's position is the
step itself (input_pipeline.py). Orbax finalises a step atomically, so a listed step is
complete; an unreadable one is set aside (`WORKDIR/unreadable_checkpoints/`) and the
previous one used.

Identity: `meta` holds the run's whole flat config (run_record.py), in the step because
orbax finalises a step's items together: a step always carries the config it was
trained with, so a lost `config.json` is checked and rewritten from it, key by key.

Block layout: a checkpoint keeps the run's own (a scanned model's blocks stacked), so
a save writes the state as the step left it, with no conversion program on every save.
Layouts are converted (`models.to_layout`) only where they meet: once on a resume whose
`model.scan` changed, and on the host where weights.load_params releases a workdir's
parameters in the layout people exchange.
"""

import os
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging
from jax.experimental import multihost_utils

from mixer_jax import errors
from mixer_jax import models

CHECKPOINT_DIR = "checkpoints"


def saved_steps(workdir: str):
  """The training checkpoints' steps in a workdir (none: []), without opening them."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def saved_config(workdir: str):
  """(step, flat config) from the `meta` of the newest step that has one, or (step, None)
  where the newest readable steps predate configs in checkpoints; (None, None) without
  readable steps."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  newest = None
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True), item_handlers={"meta": ocp.JsonCheckpointHandler()}
                             ) as manager:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      except Exception:  # An unreadable step: the restore sets it aside later.
        continue
      newest = step if newest is None else newest
      if isinstance(meta["meta"].get("config"), dict):
        return step, meta["meta"]["config"]
  return newest, None


def read_params(workdir: str, step: Optional[int] = None):
  """The parameters (numpy, as stored) of a workdir's newest readable step, or of
  `step`; read via this process's first device, so from any topology."""
  directory, unreadable = os.path.join(workdir, CHECKPOINT_DIR), []
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for step in reversed(saved_steps(workdir) if step is None else [step]):
    try:
      # The item's own handler: a StandardCheckpointer at one item of a manager's step
      # warns that the step's metadata (one level up) is missing.
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


class TrainCheckpoints:
  """Orbax train-state checkpoints of a workdir, in the run's own block layout.

  `shardings`: the run's rules, a function of a shape-only train state (or part of
  one) in either layout -> its shardings (`state.Setup.shardings`). Needed only for a
  resume whose block layout is not the files' (`model.scan` changed).
  """

  def __init__(self, workdir: str, keep: int,
               shardings: Optional[Callable[[Any], Any]] = None,
               config: Optional[Mapping[str, Any]] = None):
    self._shardings = shardings
    self._config = dict(config) if config is not None else None  # Saved with each step.
    self.set_aside = []  # Unreadable steps set aside by restore_latest (every process).
    self.moved_aside: Dict[int, str] = {}  # Where each went (process 0).
    self.aside_dir = os.path.join(workdir, "unreadable_checkpoints")
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
    try:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state["params"]),
          opt_state=ocp.args.StandardSave(state["opt_state"]),
          meta=ocp.args.JsonSave({"step": step} if self._config is None
                                 else {"step": step, "config": self._config})), force=True)
      self.manager.wait_until_finished()
    except Exception as e:  # Disk full, permissions, a vanished mount...
      previous = [s for s in self.manager.all_steps() if s != step]
      kept = f"step {max(previous)} is intact" if previous else "no earlier checkpoint exists"
      raise errors.WorkdirError(
          f"Saving checkpoint step {step} in {self.dir} failed ({errors.short(e)}); {kept}, so "
          "free disk space (or fix the path) and rerun the same command to resume.") from e

  def restore_latest(self, abstract_state) -> Optional[Dict[str, Any]]:
    """Newest readable step (falling back past unreadable ones, which are set aside),
    or None; in the layout and with the shardings of `abstract_state`."""
    wanted = {"params": abstract_state["params"], "opt_state": abstract_state["opt_state"]}
    layout, unreadable = models.layout_or_none(wanted), []
    try:
      for step in sorted(self.manager.all_steps(), reverse=True):
        try:
          metadata = self.manager.item_metadata(step)["params"]
          stored = models.layout_or_none(getattr(metadata, "tree", metadata))
          target = wanted if stored in (None, layout) else self._target(wanted, stored)
          restored = self.manager.restore(step, args=ocp.args.Composite(
              params=ocp.args.StandardRestore(target["params"]),
              opt_state=ocp.args.StandardRestore(target["opt_state"]),
              meta=ocp.args.JsonRestore()))
        except Exception as e:  # Truncated or corrupted files: use the previous step.
          logging.error("Checkpoint step %d in %s is unreadable (%s); falling back to the "
                        "previous one.", step, self.dir, errors.short(e))
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
    self.set_aside += list(steps)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mixer_set_aside_unreadable_checkpoints")
    if jax.process_index() == 0:
      aside = self.aside_dir
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        os.replace(os.path.join(self.dir, str(step)), target)
        self.moved_aside[step] = target
        logging.error("Moved unreadable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mixer_set_aside_done")
    self.manager.reload()

  def close(self):
    self.manager.close()
