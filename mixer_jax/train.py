"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config -> mesh -> data -> model -> optimiser -> state
(restored, initialised from a checkpoint, or fresh) -> compiled steps -> loop.
Everything a user can get wrong is checked before anything is compiled.

The train step is a pure function of (state, batch): every random number derives
from (config.seed, step), so a resumed run is the same run.
"""

import collections
import contextlib
import os
import signal
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mixer_jax import checkpoint
from mixer_jax import errors
from mixer_jax import evaluation
from mixer_jax import input_pipeline
from mixer_jax import metrics as metrics_lib
from mixer_jax import resolution
from mixer_jax import run_record
from mixer_jax import sharding
from mixer_jax import state as state_lib
from mixer_jax import workdir_lock


# ------------------------------------------------------------------ preemption
class PreemptionWatcher:
  """Agrees on one step after which every process stops, once any process got SIGTERM
  (a preemption notice) or Ctrl-C.

  The signal handler only sets this process's flag. After every step each process
  dispatches a tiny all-reduce of the flags (sharding.any_process), queued behind the
  step like any device work, and reads the one dispatched `LAG` steps earlier, which
  has finished by then: the host never waits for the device, and since every process
  reads the same all-reduce after the same step, all stop after the same step (at
  most LAG + 1 steps after the signal). One code path for 1 and N processes.

  Ctrl-C saves like SIGTERM; a second Ctrl-C stops at once (Python's KeyboardInterrupt).
  JAX's own preemption service is switched off (distributed.py): it would install a
  competing C++ handler, and its sync point (largest step reported, plus one) is never
  reached by a resumed run that is notified before its first step.
  """
  LAG = 2

  def __init__(self, mesh):
    self._mesh = mesh
    self._signalled = False
    self.interrupted = False  # Ctrl-C on this process (exit 130 after saving).
    self._checks = collections.deque()
    self._previous = {s: signal.signal(s, self._handler)
                      for s in (signal.SIGTERM, signal.SIGINT)}

  def _handler(self, signum, frame):
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: every process stops after the same step and saves a "
                      "checkpoint; Ctrl-C again stops at once without saving.")
      self.interrupted = True
      signal.signal(signal.SIGINT, signal.default_int_handler)
    else:
      logging.warning("SIGTERM received: every process stops after the same step, saves "
                      "a checkpoint and exits.")
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    """Call after every step, on every process; True on all of them at the same step."""
    del step  # The agreement is on the call count, the same on every process.
    self._checks.append(sharding.any_process(self._signalled, self._mesh))
    if len(self._checks) <= self.LAG:
      return False
    return bool(self._checks.popleft())

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


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


def lock_workdir(workdir: str, mesh) -> workdir_lock.WorkdirLock:
  """Process 0 takes the workdir's lock for the whole run; every process learns if it
  could not (an all-reduce), so all stop with the holder named on process 0."""
  lock = workdir_lock.WorkdirLock(workdir)
  failure = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.WorkdirError as e:
      failure = e
  if jax.process_count() > 1 and bool(sharding.any_process(failure is not None, mesh)):
    failure = failure or errors.WorkdirError(
        f"Workdir {workdir} is in use by another run (named in process 0's log); stop it "
        "or choose another --workdir.")
  if failure is not None:
    raise failure
  return lock


def check_record(workdir: str, config, has_checkpoints: bool, accept) -> Dict[str, Any]:
  """The recorded config of a run being resumed must be this one (run_record.py)."""
  record = run_record.read(workdir)
  if record is None or not has_checkpoints:
    return {}
  found = run_record.check_resume(record, config, accept, workdir)
  for key, (old, new) in found.items():
    logging.warning("Resuming with config.%s changed: %r -> %r%s.", key, old, new,
                    "" if key in run_record.EXTEND_OR_OBSERVE | run_record.EXECUTION
                    else " (accepted with --accept_changes)")
  return found


def train_and_evaluate(config, workdir: str, accept_changes=()) -> Dict[str, float]:
  """Trains, evaluates every `eval_every_steps` and at the end; returns the last eval.

  `accept_changes`: config keys a resumed run may change although they alter the run
  (run_record.py); "all" accepts every change.
  """
  # --- Check the config -------------------------------------------------------
  pretrained = pretrained_info = None
  if config.init_from:
    pretrained, pretrained_info = checkpoint.load_params(config.init_from)
  state_lib.resolve_model(config, pretrained_info, config.init_from)
  state_lib.validate_config(config)
  if not config.image_size:
    raise errors.ConfigError("config.image_size=0 means init_from's image size, but no "
                             "config.init_from is set; set --config.image_size.")
  mesh = sharding.make_mesh(config.mesh_model)
  sharding.check_batch_size(config.batch_size, config.grad_accum_steps, mesh)
  eval_batch = state_lib.eval_batch_size(config, mesh)
  prepare_workdir(workdir)
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(lock_workdir(workdir, mesh).release)
    return _train(config, workdir, mesh, eval_batch, pretrained, pretrained_info,
                  accept_changes, cleanup)


def _train(config, workdir, mesh, eval_batch, pretrained, pretrained_info, accept_changes,
           cleanup):
  """The run itself, in the workdir's lock; `cleanup` closes what it opens."""
  # --- The run's record: a resume may not silently change the run -------------
  saved_steps = checkpoint.saved_steps(workdir)
  accepted = check_record(workdir, config, bool(saved_steps), accept_changes)

  # --- Input pipeline ---------------------------------------------------------
  source = input_pipeline.get_source(config)
  info = input_pipeline.dataset_info(source, [config.train_split, config.eval_split])
  input_pipeline.describe_splits(source, info, config)  # Counts; one class is refused.
  num_classes = config.num_classes or info.num_classes
  if num_classes < info.num_classes:
    raise errors.ConfigError(
        f"config.num_classes={num_classes} is smaller than the {info.num_classes} classes "
        f"of {info.name}; labels would be out of range.")
  total_steps = total_train_steps(config, info.num_examples[config.train_split])

  # --- Model, optimiser, shardings (state.py) ---------------------------------
  fields = state_lib.size_fields(config)
  if pretrained is not None:
    # Higher-resolution fine-tuning: K^2 token-mixing copies (resolution.py).
    # A tokens_mlp_dim naming the checkpoint's own D_S (custom models spell out every
    # size) still means "the pre-trained model": only K^2 * D_S can load it.
    if (config.model.tokens_mlp_dim == pretrained_info["model"].get("tokens_mlp_dim")
        and pretrained_info.get("image_size")
        and pretrained_info["image_size"] != config.image_size):
      fields.update(resolution.hires_model_overrides(pretrained, config.image_size))
  setup = state_lib.Setup(config, num_classes, total_steps, fields=fields, mesh=mesh)
  record = dict(model=fields, num_classes=num_classes, image_size=config.image_size,
                class_names=info.class_names, dataset=info.name,
                family=config.model.family, variant=config.model.name)
  check_same_model(workdir, record)
  if pretrained is not None:
    # Every key and shape checked now, before anything is compiled.
    checkpoint.load_pretrained(
        jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                               setup.abstract_state["params"]),
        pretrained, source=config.init_from, log=False)

  # --- Train state: restore, init_from, or fresh -------------------------------
  ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints, setup.shardings)
  cleanup.callback(ckpts.close)
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
  if start_step >= total_steps:
    final = metrics_lib.last_eval(workdir)
    logging.warning("Run %s already finished at step %d (of %d); its final metrics: %s. "
                    "Raise config.num_train_steps to train further, or use a new --workdir.",
                    workdir, start_step, total_steps, final)
    return final
  if jax.process_index() == 0:
    checkpoint.write_model_file(workdir, record)
    previous = run_record.read(workdir) if start_step else None
    run_record.write(workdir, config, run_record.start_entry(
        start_step, jax.process_count(), jax.device_count(), jax.devices()[0].device_kind,
        accepted), previous)
  logging.info("Config (recorded in %s):\n%s", os.path.join(workdir, run_record.FILE),
               "\n".join(f"  {k} = {v!r}"
                         for k, v in sorted(run_record.flat_config(config).items())))
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
  cleanup.callback(writer.close)
  cleanup.callback(writer.flush)
  progress = metrics_lib.Progress(total_steps, config.log_every_steps)
  preemption = PreemptionWatcher(mesh)
  cleanup.callback(preemption.close)
  logging.info("Training %s (%s params) for %d steps from step %d on %d devices, %d processes.",
               config.model.name, f"{setup.num_params:,}", total_steps, start_step,
               jax.device_count(), pc)
  history, eval_metrics = [], {}
  step = start_step
  while step < total_steps:
    local = next(train_iter)
    if step == start_step and config.log_image_grid:
      writer.write_images(step, {"train/augmented_images":
                                 metrics_lib.image_grid(local["image"].numpy())})
    batch = sharding.global_batch(input_pipeline.to_numpy(local), mesh)
    state, step_metrics = train_step(state, batch)
    step += 1
    history.append((step, step_metrics))
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
    progress(step)
    with progress.paused():
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
      if preemption.interrupted:
        raise errors.Interrupted(f"checkpoint saved at step {step}; run the same command "
                                 "to resume.")
      logging.warning("Preempted: checkpoint saved at step %d; run the same command to "
                      "resume.", step)
      break
  return eval_metrics
