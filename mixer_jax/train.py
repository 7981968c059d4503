"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config (init_from's architecture taken first) -> mesh
-> the workdir's session (lock, run record, model file, preemption: workdir.py) ->
data -> model, optimiser, shardings -> state (restored, or fresh with init_from
merged in: weights.init_state) -> compiled steps -> loop.
Everything a user can get wrong is checked before anything is compiled.

The train step is a pure function of (state, batch): every random number derives
from (config.seed, step), so a resumed run is the same run.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mixer_jax import checkpoint
from mixer_jax import device_memory
from mixer_jax import errors
from mixer_jax import evaluator as evaluator_lib  # the loop names its instance `evaluator`
from mixer_jax import input_pipeline
from mixer_jax import metrics as metrics_lib
from mixer_jax import resolution
from mixer_jax import run_record
from mixer_jax import sharding
from mixer_jax import state as state_lib
from mixer_jax import weights
from mixer_jax import workdir as workdir_lib


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


def train_and_evaluate(config, workdir: str, accept_changes=(),
                       outcome=None) -> Dict[str, float]:
  """Trains, evaluates every `eval_every_steps` and at the end; returns the last eval.

  `accept_changes`: config keys a resumed run may change although they alter the run
  (run_record.py); "all" accepts every change, "restart" a start over in a workdir
  whose every checkpoint was unreadable. `outcome`: a dict filled with what happened
  (workdir.Session.outcome: status, step, saved_step, eval, eval_step), also when the
  run ends by an exception (Ctrl-C: errors.Interrupted).
  """
  # --- Check the config -------------------------------------------------------
  pretrained = pretrained_info = None
  if config.init_from:
    pretrained, pretrained_info = weights.load_params(config.init_from)
  state_lib.resolve_model(config, pretrained_info, config.init_from)
  state_lib.validate_config(config)
  # "auto" -> where it runs here, before the run record compares it with a resume's.
  state_lib.resolve_randaugment_on(config)
  if not config.image_size:
    raise errors.ConfigError("config.image_size=0 means init_from's image size, but no "
                             "config.init_from is set; set --config.image_size.")
  mesh = sharding.make_mesh(config.mesh_model)
  sharding.check_batch_size(config.batch_size, config.grad_accum_steps, mesh)
  eval_batch = state_lib.eval_batch_size(config, mesh)
  # --- The workdir: lock, run record (a resume may not silently change the run) ---
  with workdir_lib.session(config, workdir, mesh, accept_changes, outcome) as run:
    # --- Input pipeline ---------------------------------------------------------
    source = input_pipeline.get_source(config)
    input_pipeline.resolve_splits(config, source)  # The fine-tuning configs leave them "".
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
    # Higher-resolution fine-tuning: K^2 token-mixing copies (resolution.py). A
    # tokens_mlp_dim naming the checkpoint's own D_S (custom models spell out every
    # size) still means "the pre-trained model": only K^2 * D_S can load it.
    if (pretrained is not None and pretrained_info.get("image_size")
        and config.model.tokens_mlp_dim == pretrained_info["model"].get("tokens_mlp_dim")
        and pretrained_info["image_size"] != config.image_size):
      fields.update(resolution.hires_model_overrides(pretrained, config.image_size))
    setup = state_lib.Setup(config, num_classes, total_steps, fields=fields, mesh=mesh)
    record = dict(model=fields, num_classes=num_classes, image_size=config.image_size,
                  class_names=info.class_names, dataset=info.name,
                  family=config.model.family, variant=config.model.name,
                  split_sizes=info.num_examples)
    run.check_model(record)
    input_pipeline.check_image_size(source, config)  # Fixed-size images vs image_size.
    # Compiled before any state is placed: a step that cannot fit is one sentence.
    logging.info("Compiling the train step of %s.", config.model.name)
    train_step = device_memory.compiled_train_step(setup, config.batch_size)

    # --- Train state: restored, or fresh (with init_from merged in) ---------------
    # Each checkpoint carries the run's config: its identity without config.json.
    ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints, setup.shardings,
                                        config=run_record.flat_config(config))
    run.callback(ckpts.close)
    state = ckpts.restore_latest(setup.abstract_state)
    if state is None:
      run.check_fresh_start(ckpts, config.checkpoint_every_steps)  # No silent restart.
      state = weights.init_state(setup, pretrained, config.init_from)
    start_step = int(jax.device_get(state["step"]))
    outcome = run.outcome
    outcome.update(step=start_step, saved_step=start_step if start_step else None)
    if start_step >= total_steps:
      final = metrics_lib.last_eval(workdir)
      logging.warning("Run %s already finished at step %d (of %d); its final metrics: %s. "
                      "To train further, fine-tune from it in a new --workdir "
                      "(--config.init_from=%s), or raise config.num_train_steps with "
                      "--accept_changes=num_train_steps (the learning-rate schedule is "
                      "then rebuilt over the new length: a warm restart).",
                      workdir, start_step, total_steps, final, workdir)
      outcome.update(status="finished", eval=final, eval_step=start_step if final else None)
      return final
    run.start(start_step, config, record)
    # The input position is the step: the stream resumes at the same global batch on
    # any number of processes.
    pc = jax.process_count()
    train_iter = iter(input_pipeline.train_dataset(source, config, config.batch_size // pc,
                                                   num_classes, jax.process_index(), pc,
                                                   start_step))

    # --- Compiled steps -----------------------------------------------------------
    evaluator = evaluator_lib.Evaluator(setup.eval_step(), config, source, config.eval_split,
                                     num_classes, mesh, eval_batch)

    # --- Loop ---------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir)
    run.callback(writer.close)
    run.callback(writer.flush)
    progress = metrics_lib.Progress(total_steps, config.log_every_steps)
    preemption = run.preemption
    logging.info("Training %s (%s params) for %d steps from step %d on %d devices, %d processes.",
                 config.model.name, f"{setup.num_params:,}", total_steps, start_step,
                 jax.device_count(), pc)
    history, eval_metrics = [], {}
    step = start_step
    while step < total_steps:
      local = next(train_iter)
      if step == start_step and config.log_image_grid:
        # The host's output (uint8): with randaugment_on="device", before augmentation.
        writer.write_images(step, {"train/augmented_images":
                                   metrics_lib.image_grid(local["image"].numpy())})
      batch = sharding.global_batch(input_pipeline.to_numpy(local), mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      outcome["step"] = step
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
          logging.info("Evaluating step %d on %s.", step, config.eval_split)
          eval_metrics = evaluator(state["params"])
          outcome.update(eval=eval_metrics, eval_step=step)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        if config.fewshot_every_steps and (step % config.fewshot_every_steps == 0 or is_last):
          # Linear probes on frozen pre-logits (paper's few-shot results).
          shots = evaluator_lib.fewshot_metrics(
              setup.feature_model(),
              {k: v for k, v in state["params"].items() if k != "head"}, config, source,
              config.fewshot_train_split or config.train_split, config.eval_split,
              num_classes, mesh, eval_batch)
          writer.write_scalars(step, {f"fewshot/{k[len('fewshot_'):]}": v
                                      for k, v in shots.items()})
        if step % config.checkpoint_every_steps == 0 or is_last or stop:
          _check_metrics(history, config.nonfinite)
          logging.info("Saving checkpoint step %d.", step)
          ckpts.save(step, state)
          outcome["saved_step"] = step
      if stop or (is_last and preemption.interrupted):
        if preemption.interrupted:
          # Also a Ctrl-C during the final evaluation or save: those finished, then 130.
          outcome["status"] = "interrupted"
          done = " (the run is finished)" if is_last else "; run the same command to resume"
          raise errors.Interrupted(f"checkpoint saved at step {step}{done}.")
        logging.warning("Preempted: checkpoint saved at step %d; run the same command to "
                        "resume.", step)
        outcome["status"] = "finished" if is_last else "preempted"
        break
    else:
      outcome["status"] = "finished"
    return eval_metrics
