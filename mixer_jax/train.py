"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config -> mesh -> data -> model -> optimiser -> state
(restored, initialised from a checkpoint, or fresh) -> compiled steps -> loop.
Everything a user can get wrong is checked before anything is compiled.

The train step is a pure function of (state, batch): every random number derives
from (config.seed, step), so a resumed run is the same run.
"""

import collections
import os
import signal
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions

from mixer_jax import checkpoint
from mixer_jax import errors
from mixer_jax import evaluation
from mixer_jax import input_pipeline
from mixer_jax import metrics as metrics_lib
from mixer_jax import resolution
from mixer_jax import sharding
from mixer_jax import state as state_lib


# ------------------------------------------------------------------ preemption
class PreemptionWatcher:
  """Agrees on one step after which every process stops, once any process got SIGTERM.

  The SIGTERM handler only sets this process's flag. After every step each process
  dispatches a tiny all-reduce of the flags (sharding.any_process), queued behind the
  step like any device work, and reads the one dispatched `LAG` steps earlier, which
  has finished by then: the host never waits for the device, and since every process
  reads the same all-reduce after the same step, all stop after the same step (at
  most LAG + 1 steps after the signal). One code path for 1 and N processes.

  JAX's own preemption service is switched off (distributed.py): it would install a
  competing C++ handler, and its sync point (largest step reported, plus one) is never
  reached by a resumed run that is notified before its first step.
  """
  LAG = 2

  def __init__(self, mesh):
    self._mesh = mesh
    self._signalled = False
    self._checks = collections.deque()
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: every process stops after the same step, saves a "
                    "checkpoint and exits.")
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    """Call after every step, on every process; True on all of them at the same step."""
    del step  # The agreement is on the call count, the same on every process.
    self._checks.append(sharding.any_process(self._signalled, self._mesh))
    if len(self._checks) <= self.LAG:
      return False
    return bool(self._checks.popleft())

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.WorkdirError(f"Workdir {workdir} is not writable ({e.strerror}); choose another "
                       "--workdir.") from None


def check_same_model(workdir: str, record: Dict[str, Any]) -> None:
  """A workdir's checkpoints must be of the model being trained."""
  old = checkpoint.read_model_file(workdir)
  if old is None:
    return
  for key in ("model", "num_classes", "image_size"):
    if old.get(key) != record.get(key):
      raise errors.WorkdirError(
          f"Workdir {workdir} holds checkpoints of a different model ({key}={old.get(key)} "
          f"there, {record.get(key)} now); use a new --workdir or the original config.")


# ------------------------------------------------------------------------- loop
def total_train_steps(config, num_train_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(config.num_epochs * num_train_examples / config.batch_size))


def _check_metrics(history, nonfinite: str):
  """Host-side look at buffered step metrics (no per-step host sync)."""
  if not history:
    return []
  # One transfer per metric for the whole window, not one per step.
  steps = [s for s, _ in history]
  stacked = jax.device_get({k: jnp.stack([m[k] for _, m in history]) for k in history[0][1]})
  rows = [(s, {k: v[i] for k, v in stacked.items()}) for i, s in enumerate(steps)]
  for step, row in rows:
    if row["finite"] < 1 and nonfinite == "stop":
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(row[k])]
      raise errors.NonFiniteError(
          f"Non-finite {' and '.join(bad) or 'loss'} at step {step}; stopped without saving "
          "it, the last good checkpoint is kept (lower the learning rate or set "
          "config.nonfinite='skip').")
  return rows


def train_and_evaluate(config, workdir: str) -> Dict[str, float]:
  """Trains, evaluates every `eval_every_steps` and at the end; returns the last eval."""
  # --- Check the config -------------------------------------------------------
  state_lib.validate_config(config)
  mesh = sharding.make_mesh(config.mesh_model)
  sharding.check_batch_size(config.batch_size, config.grad_accum_steps, mesh)
  eval_batch = state_lib.eval_batch_size(config, mesh)
  prepare_workdir(workdir)

  # --- Input pipeline ---------------------------------------------------------
  source = input_pipeline.get_source(config)
  info = input_pipeline.dataset_info(source, [config.train_split, config.eval_split])
  num_classes = config.num_classes or info.num_classes
  if num_classes < info.num_classes:
    raise errors.ConfigError(
        f"config.num_classes={num_classes} is smaller than the {info.num_classes} classes "
        f"of {info.name}; labels would be out of range.")
  total_steps = total_train_steps(config, info.num_examples[config.train_split])

  # --- Model, optimiser, shardings (state.py) ---------------------------------
  fields = state_lib.model_fields(config)
  pretrained = None
  if config.init_from:
    pretrained, pretrained_info = checkpoint.load_params(config.init_from)
    # A tokens_mlp_dim naming the checkpoint's own D_S (custom models spell out every
    # size) still means "the pre-trained model": only K^2 * D_S can load it.
    if (config.model.tokens_mlp_dim in (0, pretrained_info["model"]["tokens_mlp_dim"])
        and pretrained_info.get("image_size")
        and pretrained_info["image_size"] != config.image_size):
      # Higher-resolution fine-tuning: K^2 token-mixing copies (resolution.py).
      fields.update(resolution.hires_model_overrides(pretrained, config.image_size))
  setup = state_lib.Setup(config, num_classes, total_steps, fields=fields, mesh=mesh)
  record = dict(model=fields, num_classes=num_classes, image_size=config.image_size,
                class_names=info.class_names, dataset=info.name,
                variant=config.model.variant)
  check_same_model(workdir, record)
  if pretrained is not None:
    # Every key and shape checked now, before anything is compiled.
    checkpoint.load_pretrained(
        jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                               setup.abstract_state["params"]),
        pretrained, source=config.init_from)

  # --- Train state: restore, init_from, or fresh -------------------------------
  ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints)
  if jax.process_index() == 0:
    checkpoint.write_model_file(workdir, record)
  state = ckpts.restore_latest(setup.abstract_state)
  if state is None:
    state = setup.init_state()
    if pretrained is not None:
      # Merged with the real fresh parameters: a re-initialised head keeps its
      # initialiser's values (zeros kernel, head_bias_init bias).
      merged = checkpoint.load_pretrained(jax.device_get(state["params"]), pretrained,
                                          source=config.init_from)
      state = setup.state_with_params(merged)
  start_step = int(jax.device_get(state["step"]))
  # The input position is the step: the stream resumes at the same global batch on
  # any number of processes.
  pc = jax.process_count()
  train_iter = iter(input_pipeline.train_dataset(source, config, config.batch_size // pc,
                                                 num_classes, jax.process_index(), pc,
                                                 start_step))

  # --- Compiled steps -----------------------------------------------------------
  train_step = setup.train_step()
  evaluator = evaluation.Evaluator(setup.eval_step(), config, source, config.eval_split,
                                   num_classes, mesh, eval_batch)

  # --- Loop ---------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                             writer=writer.clu_writer,
                                             every_steps=config.log_every_steps)
  preemption = PreemptionWatcher(mesh)
  logging.info("Training %s (%s params) for %d steps from step %d on %d devices, %d processes.",
               config.model.variant, f"{setup.num_params:,}", total_steps, start_step,
               jax.device_count(), pc)
  history, eval_metrics = [], {}
  step = start_step
  try:
    while step < total_steps:
      local = next(train_iter)
      if step == start_step and config.log_image_grid:
        writer.write_images(step, {"train/augmented_images":
                                   metrics_lib.image_grid(local["image"].numpy())})
      batch = sharding.global_batch(input_pipeline.to_numpy(local), mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      history.append((step, step_metrics))
      progress(step)
      is_last = step == total_steps
      stop = preemption.should_stop(step)
      if step % config.log_every_steps == 0 or is_last or stop:
        rows = _check_metrics(history, config.nonfinite)
        history = []
        means = {f"train/{k}": np.mean([r[k] for _, r in rows]) for k in rows[0][1]
                 if k != "finite"}
        means["train/nonfinite_steps"] = float(sum(1 - r["finite"] for _, r in rows))
        means["train/learning_rate"] = float(setup.schedule(step - 1))
        writer.write_scalars(step, means)
      if step % config.eval_every_steps == 0 or is_last:
        eval_metrics = evaluator(state["params"])
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      if config.fewshot_every_steps and (step % config.fewshot_every_steps == 0 or is_last):
        # Linear probes on frozen pre-logits (paper's few-shot results).
        shots = evaluation.fewshot_metrics(
            setup.feature_model(),
            {k: v for k, v in state["params"].items() if k != "head"}, config, source,
            config.fewshot_train_split or config.train_split, config.eval_split,
            num_classes, mesh, eval_batch)
        writer.write_scalars(step, {f"fewshot/{k[len('fewshot_'):]}": v
                                    for k, v in shots.items()})
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        _check_metrics(history, config.nonfinite)
        ckpts.save(step, state)
      if stop:
        logging.warning("Preempted: checkpoint saved at step %d; run the same command to "
                        "resume.", step)
        break
  finally:
    writer.flush()
    preemption.close()
    ckpts.close()
    writer.close()
  return eval_metrics
