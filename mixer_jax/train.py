"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config -> mesh -> data -> model -> optimiser -> state
(restored, initialised from a checkpoint, or fresh) -> compiled steps -> loop.
Everything a user can get wrong is checked before anything is compiled.

The train step is a pure function of (state, batch): every random number derives
from (config.seed, step), so a resumed run is the same run.
"""

import collections
import functools
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from mixer_jax import checkpoint
from mixer_jax import input_pipeline
from mixer_jax import metrics as metrics_lib
from mixer_jax import models
from mixer_jax import optim
from mixer_jax import resolution
from mixer_jax import sharding

LOSSES = ("softmax", "sigmoid")
NONFINITE = ("stop", "skip")


class ConfigError(ValueError):
  """A config value that cannot work."""


class NonFiniteError(RuntimeError):
  """The loss or gradients became NaN/inf."""


class WorkdirError(ValueError):
  """A workdir that cannot be used."""


# ----------------------------------------------------------------------- config
def validate_config(config: ml_collections.ConfigDict) -> None:
  """One clear sentence per bad value, before anything is compiled."""
  def positive(*names):
    for name in names:
      value = config[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config.{name}={value!r} must be a positive number.")

  def non_negative(*names):
    for name in names:
      value = config[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"config.{name}={value!r} must be zero or positive.")

  def one_of(name, allowed):
    if config[name] not in allowed:
      raise ConfigError(f"config.{name}={config[name]!r} is not one of {', '.join(allowed)}.")

  positive("batch_size", "image_size", "shuffle_buffer", "grad_accum_steps",
           "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints")
  non_negative("num_train_steps", "learning_rate", "warmup_steps", "weight_decay",
               "grad_clip_norm", "mixup_alpha", "randaugment_layers", "eval_batch_size",
               "num_classes", "end_learning_rate", "fewshot_every_steps")
  if config.num_train_steps == 0:
    positive("num_epochs")
  if not 0 <= config.label_smoothing < 1:
    raise ConfigError(f"config.label_smoothing={config.label_smoothing!r} must be in [0, 1).")
  if not 0 <= config.randaugment_magnitude <= 30:
    raise ConfigError(f"config.randaugment_magnitude={config.randaugment_magnitude!r} must be "
                      "in [0, 30] (paper: 15).")
  if not 0 < config.eval_crop_fraction <= 1:
    raise ConfigError(f"config.eval_crop_fraction={config.eval_crop_fraction!r} must be in (0, 1].")
  one_of("loss", LOSSES)
  one_of("nonfinite", NONFINITE)
  one_of("optimizer", optim.OPTIMIZERS)
  one_of("lr_decay", optim.SCHEDULES)
  one_of("sharding", sharding.STRATEGIES)
  one_of("train_crop", ("inception", "resize", "none"))
  one_of("eval_preprocess", ("resize_crop", "resize"))
  one_of("dtype", ("float32", "bfloat16", "float16"))
  for name in ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
    value = config.model[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f"config.model.{name}={value!r} must be a positive integer "
                        "(or 0 for the variant's value).")
  if config.mesh_model < 1:
    raise ConfigError(f"config.mesh_model={config.mesh_model!r} must be a positive integer.")


def model_fields(config, num_classes: int) -> Dict[str, Any]:
  """create_model kwargs (JSON-friendly) from the config's model section."""
  spec = models.parse_variant(config.model.variant)
  fields = {k: (config.model[k] or getattr(spec, k)) for k in
            ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim")}
  return fields


def build_model(config, num_classes: int, fields: Dict[str, Any], *, train: bool = True):
  return models.create_model(
      config.model.variant, num_classes, **fields,
      stoch_depth=config.model.stoch_depth if train else 0.0,
      dropout=config.model.dropout if train else 0.0,
      dtype=config.dtype, head_bias_init=config.head_bias_init, remat=config.model.remat)


# ------------------------------------------------------------------ steps
# The step functions live in steps.py (no TensorFlow there, so benchmark.py can
# build the same train step on machines without it); re-exported here.
from mixer_jax import steps  # noqa: E402
from mixer_jax.steps import loss_fn, make_eval_step, make_train_step, mixup  # noqa: E402,F401


def summarize_eval(sums: Dict[str, Any]) -> Dict[str, float]:
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  n = sums["num_examples"]
  out = {"loss": sums["loss"] / n, "accuracy": sums["accuracy"] / n, "num_examples": n}
  if "top5" in sums:
    out["top5"] = sums["top5"] / n
  if "real_accuracy" in sums:
    out["real_accuracy"] = sums["real_accuracy"] / max(sums["real_num_examples"], 1)
    out["real_num_examples"] = sums["real_num_examples"]
  return out


class Evaluator:
  """Compiled once; runs the whole split, every example exactly once."""

  def __init__(self, model, config, source, split, num_classes, mesh, batch_size):
    self.config, self.source, self.split = config, source, split
    self.num_classes, self.mesh = num_classes, mesh
    self.local_batch = batch_size // jax.process_count()
    step = make_eval_step(model, config, num_classes)
    self._step = jax.jit(step, out_shardings=sharding.replicated(mesh))

  def __call__(self, params) -> Dict[str, float]:
    ds, _ = input_pipeline.eval_dataset(self.source, self.config, self.split, self.local_batch,
                                        self.num_classes, jax.process_index(),
                                        jax.process_count())
    total = None
    for batch in ds.as_numpy_iterator():
      sums = self._step(params, sharding.global_batch(batch, self.mesh))
      total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    return summarize_eval(total)


def fewshot_metrics(feature_model, params, config, source, train_split: str, test_split: str,
                    num_classes: int, mesh, batch_size: int) -> Dict[str, float]:
  """fewshot.fewshot_accuracy on pre-logits of train_split vs test_split."""
  from mixer_jax import fewshot

  def features(p, batch):
    f = feature_model.apply({"params": p}, batch["image"], train=False)
    return f, batch["label"], batch["mask"]
  # Replicated outputs: every process sees the whole global batch's features.
  features = jax.jit(features, out_shardings=sharding.replicated(mesh))

  def extract(split):
    ds, _ = input_pipeline.eval_dataset(source, config, split,
                                        batch_size // jax.process_count(), num_classes,
                                        jax.process_index(), jax.process_count())
    feats, labels = [], []
    for batch in ds.as_numpy_iterator():
      batch = {k: batch[k] for k in ("image", "label", "mask")}
      f, y, m = jax.device_get(features(params, sharding.global_batch(batch, mesh)))
      keep = np.asarray(m) > 0  # Padding out.
      feats.append(np.asarray(f)[keep])
      labels.append(np.asarray(y)[keep])
    return np.concatenate(feats), np.concatenate(labels)

  x, y = extract(train_split)
  x_test, y_test = extract(test_split)
  accs = fewshot.fewshot_accuracy(x, y, x_test, y_test, num_classes,
                                  shots=tuple(config.fewshot_shots), seed=config.seed)
  return {f"fewshot_{n}shot": a for n, a in accs.items()}


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


# ---------------------------------------------------------------- checkpoints
class TrainCheckpoints:
  """Orbax train-state checkpoints + per-process tf.data positions (see checkpoint.py)."""

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    self.data_dir = os.path.join(workdir, checkpoint.DATA_STATE_DIR)
    self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        # A save killed half-way leaves a temp dir; clear it so the step can be redone.
        cleanup_tmp_directories=True))

  def _data_path(self, step: int) -> str:
    return os.path.join(self.data_dir, str(step), f"process_{jax.process_index()}")

  def save(self, step: int, state, data_iterator) -> None:
    ocp = self._ocp
    try:
      # Data position first: a step orbax lists always has one.
      input_pipeline.save_iterator(data_iterator, self._data_path(step))
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state["params"]),
          opt_state=ocp.args.StandardSave(state["opt_state"]),
          meta=ocp.args.JsonSave({"step": step})), force=True)
      self.manager.wait_until_finished()
    except Exception as e:  # Disk full, permissions, a vanished mount...
      previous = [s for s in self.manager.all_steps() if s != step]
      kept = f"step {max(previous)} is intact" if previous else "no earlier checkpoint exists"
      raise WorkdirError(
          f"Saving checkpoint step {step} in {self.dir} failed ({_short(e)}); {kept}, so "
          "free disk space (or fix the path) and rerun the same command to resume.") from e
    self._prune_data_states()

  def _prune_data_states(self):
    if jax.process_index() != 0 or not os.path.isdir(self.data_dir):
      return
    kept = set(self.manager.all_steps())
    latest = max(kept) if kept else -1
    for name in os.listdir(self.data_dir):
      if name.isdigit() and int(name) not in kept and int(name) < latest:
        import shutil
        shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

  def restore_latest(self, abstract_state, data_iterator) -> Optional[Dict[str, Any]]:
    """Newest readable step (falling back past unreadable ones), or None."""
    unreadable = []
    try:
      return self._restore_newest_readable(abstract_state, data_iterator, unreadable)
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

  def _restore_newest_readable(self, abstract_state, data_iterator, unreadable):
    ocp = self._ocp
    for step in sorted(self.manager.all_steps(), reverse=True):
      data_path = self._data_path(step)
      if not os.path.isdir(data_path):
        raise WorkdirError(
            f"Checkpoint step {step} in {self.dir} has no data position for process "
            f"{jax.process_index()} ({data_path}); resume with the process count it was "
            "trained with, or use a new workdir.")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            meta=ocp.args.JsonRestore()))
        input_pipeline.restore_iterator(data_iterator, data_path)
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


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"Workdir {workdir} is not writable ({e.strerror}); choose another "
                       "--workdir.") from None


def check_same_model(workdir: str, record: Dict[str, Any]) -> None:
  """A workdir's checkpoints must be of the model (and process count) being trained."""
  old = checkpoint.read_model_file(workdir)
  if old is None:
    return
  for key in ("model", "num_classes", "image_size"):
    if old.get(key) != record.get(key):
      raise WorkdirError(
          f"Workdir {workdir} holds checkpoints of a different model ({key}={old.get(key)} "
          f"there, {record.get(key)} now); use a new --workdir or the original config.")
  if old.get("process_count") != record.get("process_count") and os.path.isdir(
      os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
    raise WorkdirError(
        f"Workdir {workdir} was trained with {old.get('process_count')} processes but this "
        f"run has {record.get('process_count')}; the data position is saved per process, "
        "so resume with the same process count.")


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
      raise NonFiniteError(
          f"Non-finite {' and '.join(bad) or 'loss'} at step {step}; stopped without saving "
          "it, the last good checkpoint is kept (lower the learning rate or set "
          "config.nonfinite='skip').")
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains, evaluates every `eval_every_steps` and at the end; returns the last eval."""
  # --- Check the config -------------------------------------------------------
  validate_config(config)
  mesh = sharding.make_mesh(config.mesh_model)
  sharding.check_batch_size(config.batch_size, config.grad_accum_steps, mesh)
  eval_batch = config.eval_batch_size or config.batch_size // config.grad_accum_steps
  sharding.check_batch_size(eval_batch, 1, mesh, name="eval_batch_size")
  prepare_workdir(workdir)

  # --- Input pipeline ---------------------------------------------------------
  source = input_pipeline.get_source(config)
  info = input_pipeline.dataset_info(source, [config.train_split, config.eval_split])
  num_classes = config.num_classes or info.num_classes
  if num_classes < info.num_classes:
    raise ConfigError(f"config.num_classes={num_classes} is smaller than the "
                      f"{info.num_classes} classes of {info.name}; labels would be out of range.")
  total_steps = total_train_steps(config, info.num_examples[config.train_split])
  pi, pc = jax.process_index(), jax.process_count()
  local_batch = config.batch_size // pc
  train_ds = input_pipeline.train_dataset(source, config, local_batch, num_classes, pi, pc)
  train_iter = iter(train_ds)

  # --- Model and optimiser ----------------------------------------------------
  fields = model_fields(config, num_classes)
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
  model = build_model(config, num_classes, fields)
  abstract_params = models.param_shapes(model, config.image_size)  # Shape errors here.
  schedule, tx = steps.optimizer_from_config(config, total_steps)
  record = dict(model=fields, num_classes=num_classes, image_size=config.image_size,
                class_names=info.class_names, dataset=info.name, process_count=pc,
                variant=config.model.variant)
  check_same_model(workdir, record)

  # --- Train state: restore, init_from, or fresh ---------------------------------
  def init_state(rng):
    params = model.init(rng, jnp.zeros((1, config.image_size, config.image_size, 3)),
                        train=False)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.sharding,
                                            config.fsdp_min_size)
  abstract_state = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_sharding)
  if pretrained is not None:
    # Every key and shape checked now, before anything is compiled.
    checkpoint.load_pretrained(
        jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract_params),
        pretrained, source=config.init_from)

  ckpts = TrainCheckpoints(workdir, config.keep_checkpoints)
  if jax.process_index() == 0:
    checkpoint.write_model_file(workdir, record)
  state = ckpts.restore_latest(abstract_state, train_iter)
  if state is None:
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
    if pretrained is not None:
      # Merge again with the real fresh parameters: a re-initialised head keeps its
      # initialiser's values (zeros kernel, head_bias_init bias).
      fresh = jax.device_get(state["params"])
      merged = checkpoint.load_pretrained(fresh, pretrained, source=config.init_from)
      params = jax.tree_util.tree_map(lambda a, f: jax.device_put(a, f.sharding),
                                      merged, state["params"])
      state = {"step": state["step"], "params": params,
               "opt_state": jax.jit(tx.init, out_shardings=state_sharding["opt_state"])(params)}
  start_step = int(jax.device_get(state["step"]))

  # --- Compiled steps ---------------------------------------------------------------
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(model, tx, config, num_classes),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  evaluator = Evaluator(build_model(config, num_classes, fields, train=False), config,
                        source, config.eval_split, num_classes, mesh, eval_batch)

  # --- Loop ---------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                             writer=writer.clu_writer,
                                             every_steps=config.log_every_steps)
  preemption = PreemptionWatcher(mesh)
  logging.info("Training %s (%s params) for %d steps from step %d on %d devices, %d processes.",
               config.model.variant, f"{models.count_params(abstract_params):,}", total_steps,
               start_step, jax.device_count(), pc)
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
        means["train/learning_rate"] = float(schedule(step - 1))
        writer.write_scalars(step, means)
      if step % config.eval_every_steps == 0 or is_last:
        eval_metrics = evaluator(state["params"])
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      if config.fewshot_every_steps and (step % config.fewshot_every_steps == 0 or is_last):
        # Linear probes on frozen pre-logits (paper's few-shot results).
        shots = fewshot_metrics(
            build_model(config, 0, fields, train=False),
            {k: v for k, v in state["params"].items() if k != "head"}, config, source,
            config.fewshot_train_split or config.train_split, config.eval_split,
            num_classes, mesh, eval_batch)
        writer.write_scalars(step, {f"fewshot/{k[len('fewshot_'):]}": v
                                    for k, v in shots.items()})
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        _check_metrics(history, config.nonfinite)
        ckpts.save(step, state, train_iter)
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

