"""A run's housekeeping in its workdir, behind one context: `session`.

    with workdir.session(config, workdir, mesh, accept_changes) as run:
      ...                                # run.saved_steps, run.check_model(record)
      run.start(step, config, record)    # model.json and config.json, once resumed
      stop = run.preemption.should_stop(step)

On entry: the workdir is created and probed for writing, process 0 takes its lock
(workdir_lock.py) for the whole run, the preemption watcher's signal handlers go in
(from here on no Ctrl-C raises inside compilation or a checkpoint write), and a
resumed run's config is compared with its record (run_record.py), refusing changes
that alter the run; without `config.json` the record is the config the newest
checkpoint carries (checkpoint.py), and without either a resume is refused. On exit,
in reverse order: whatever the run registered (`run.callback`: checkpoints, metric
writer), the preemption watcher's signal handlers, the lock.

`run.outcome` is what happened, for the last stdout line (main.py): `status`
(finished, preempted, interrupted), the `step` reached, the newest `saved_step`, and
the newest evaluation with its `eval_step`.
"""

import collections
import contextlib
import json
import os
import signal
import sys
from typing import Any, Dict, Optional

import jax
from absl import logging

from mixer_jax import checkpoint
from mixer_jax import errors
from mixer_jax import optim
from mixer_jax import run_record
from mixer_jax import sharding
from mixer_jax import workdir_lock


class PreemptionWatcher:
  """Agrees on one step after which every process stops, once any process got SIGTERM
  (a preemption notice) or Ctrl-C.

  The signal handler only sets this process's flag. After every step each process
  dispatches a tiny all-reduce of the flags (sharding.any_process), queued behind the
  step like any device work, and reads the one dispatched `LAG` steps earlier, which
  has finished by then: the host never waits for the device, and since every process
  reads the same all-reduce after the same step, all stop after the same step (at
  most LAG + 1 steps after the signal). One code path for 1 and N processes.

  Ctrl-C saves like SIGTERM, also when pressed during compilation, an evaluation or a
  save (the flag is read after the next step; after the last step the run exits 130
  once its final evaluation and checkpoint are done). A second Ctrl-C stops at once:
  the handler prints the outcome (stdout) and one line (stderr) and leaves with
  `os._exit(130)`. It never raises KeyboardInterrupt, which raised inside XLA's
  compilation (a C++ frame calling back into Python) crashed the process (exit 139).
  JAX's own preemption service is switched off (distributed.py): it would install a
  competing C++ handler, and its sync point (largest step reported, plus one) is never
  reached by a resumed run that is notified before its first step.
  """
  LAG = 2

  def __init__(self, mesh, on_second_interrupt=None):
    self._mesh = mesh
    self._signalled = False
    self.interrupted = False  # Ctrl-C on this process (exit 130 after saving).
    self._on_second_interrupt = on_second_interrupt or (lambda: os._exit(  # pylint: disable=protected-access
        errors.INTERRUPTED))
    self._checks = collections.deque()
    self._previous = {s: signal.signal(s, self._handler)
                      for s in (signal.SIGTERM, signal.SIGINT)}

  def _handler(self, signum, frame):
    if signum == signal.SIGINT:
      if self.interrupted:
        self._on_second_interrupt()
        return
      logging.warning("Ctrl-C: every process stops after the same step and saves a "
                      "checkpoint; Ctrl-C again stops at once without saving.")
      self.interrupted = True
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
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.WorkdirError(f"Workdir {workdir} is a file, not a directory; choose another "
                              "--workdir (or move the file away).")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.WorkdirError(f"Workdir {workdir} is not writable ({e.strerror}); choose another "
                       "--workdir.") from None


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


def scheduled_rate(flat: Dict[str, Any], step: int) -> Optional[float]:
  """The learning rate of step `step` under a flat config's schedule (optim.py), or None
  where the run's length depends on the dataset (num_train_steps=0)."""
  try:
    total = int(flat["num_train_steps"])
    if total <= 0:
      return None
    return float(optim.learning_rate_schedule(
        flat["learning_rate"], total, flat["warmup_steps"], flat["lr_decay"],
        flat["end_learning_rate"])(step))
  except (KeyError, TypeError, ValueError):
    return None


def check_record(workdir: str, config, saved_steps, accept) -> Dict[str, Any]:
  """The recorded config of a run being resumed must be this one (run_record.py).

  Without `config.json` the record is the config the newest checkpoint carries: a
  resume is checked against it (and `config.json` is rewritten when the run starts),
  or, where the checkpoints predate configs in checkpoints, refused unless
  `--accept_changes=all`.
  """
  if not saved_steps:
    return {}
  record = run_record.read(workdir)
  if record is None:
    step, saved = checkpoint.saved_config(workdir)
    if saved is None:
      if step is None or "all" in accept:  # Nothing readable: restore_latest decides.
        return {}
      path = os.path.join(workdir, run_record.FILE)
      raise errors.WorkdirError(
          f"Workdir {workdir} has checkpoints (newest step {step}) but no {path}, and they do "
          "not carry their config, so this resume cannot be checked; restore config.json "
          "from a backup, or accept this command's config as the run's record with "
          "--accept_changes=all.")
    logging.warning("%s is missing: checking this resume against the config saved with "
                    "checkpoint step %d, and writing it again from the checked values.",
                    os.path.join(workdir, run_record.FILE), step)
    record = {"config": saved}
  found = run_record.check_resume(record, config, accept, workdir, max(saved_steps),
                                  scheduled_rate)
  if record.get("starts") is None and jax.process_index() == 0:  # Checked: written again.
    entry = run_record.start_entry(max(saved_steps), jax.process_count(), jax.device_count(),
                                   jax.devices()[0].device_kind, found)
    entry["record_rewritten_from_checkpoint"] = True
    run_record.write(workdir, config, entry)
  for key, (old, new) in found.items():
    logging.warning("Resuming with config.%s changed: %r -> %r%s.", key, old, new,
                    "" if key in run_record.EXTEND_OR_OBSERVE | run_record.EXECUTION
                    else " (accepted with --accept_changes)")
  return found


def check_same_model(workdir: str, record: Dict[str, Any]) -> None:
  """A workdir's checkpoints must be of the model being trained."""
  old = run_record.read_model_file(workdir)
  if old is None:
    return
  for key in ("model", "num_classes", "image_size"):
    if old.get(key) != record.get(key):
      raise errors.WorkdirError(
          f"Workdir {workdir} holds checkpoints of a different model ({key}={old.get(key)} "
          f"there, {record.get(key)} now); use a new --workdir or the original config.")
  warn_moved_splits(workdir, old.get("split_sizes"), record.get("split_sizes"))


def warn_moved_splits(workdir: str, old, new) -> None:
  """Files added to or removed from a dataset between starts move its split boundaries
  (`train[:75%]`) and the training order: said, with both counts, not refused."""
  for split, count in sorted((new or {}).items()):
    before = (old or {}).get(split)
    if before is not None and before != count:
      logging.warning(
          "Split %s held %d images when workdir %s was last started and holds %d now (files "
          "were added or removed); the resumed run reads the new split, so its examples "
          "and their order from here on differ from the recorded run's.",
          split, before, workdir, count)


def check_fresh_start(workdir: str, ckpts: checkpoint.TrainCheckpoints, accept,
                      checkpoint_every_steps: int) -> None:
  """A run that finds no readable checkpoint starts from step 0 only if it had not
  progressed: no step was set aside as unreadable (now or before) and metrics.jsonl
  has no step past the first checkpoint's. Restarting a run killed before its first
  checkpoint is the same run; anything else is refused unless
  `--accept_changes=restart`."""
  if "restart" in accept:
    return
  aside = sorted(os.listdir(ckpts.aside_dir)) if os.path.isdir(ckpts.aside_dir) else []
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  logged = 0
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      for line in f:
        try:
          logged = max(logged, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):
          continue
  if not ckpts.set_aside and not aside and logged <= checkpoint_every_steps:
    return
  if ckpts.set_aside:
    moved = ", ".join(f"step {s} to {p}" for s, p in sorted(ckpts.moved_aside.items())) or (
        f"steps {sorted(ckpts.set_aside)} to {ckpts.aside_dir}")
    what = f"every checkpoint was unreadable (moved {moved})"
  elif aside:
    what = f"its checkpoints were set aside as unreadable ({ckpts.aside_dir})"
  else:
    what = f"it has no checkpoint although metrics.jsonl reached step {logged}"
  raise errors.WorkdirError(
      f"Workdir {workdir} cannot resume: {what}, and starting over would silently make "
      "it another run; use a new --workdir, or start over here deliberately with "
      "--accept_changes=restart.")


class Session:
  """One run in its workdir (see the module doc); made by `session`."""

  def __init__(self, config, workdir: str, mesh, accept_changes, stack, outcome=None):
    self.workdir, self.mesh, self._stack = workdir, mesh, stack
    self.accept = list(accept_changes)
    self.outcome: Dict[str, Any] = {} if outcome is None else outcome
    self.outcome.update(status=None, step=None, saved_step=None)
    self._preemption = None
    self.preemption  # pylint: disable=pointless-statement  (handlers in, before anything)
    self.saved_steps = checkpoint.saved_steps(workdir)
    self.accepted = check_record(workdir, config, self.saved_steps, self.accept)
    self.outcome["saved_step"] = max(self.saved_steps, default=None)
    # Until the state is restored the run stands where its newest checkpoint is.
    self.outcome["step"] = max(self.saved_steps, default=0)

  def check_fresh_start(self, ckpts, checkpoint_every_steps: int) -> None:
    check_fresh_start(self.workdir, ckpts, self.accept, checkpoint_every_steps)

  def _second_interrupt(self):
    """A second Ctrl-C: the outcome and one line, then out at once (no unwinding)."""
    saved = max(checkpoint.saved_steps(self.workdir), default=None)
    outcome = dict(self.outcome, status="interrupted", saved_step=saved)
    if jax.process_index() == 0:
      print(json.dumps(outcome, default=float), flush=True)
    kept = (f"the newest checkpoint is step {saved}, which the same command resumes from"
            if saved is not None else "no checkpoint was saved, so the same command starts "
            "from step 0")
    print(f"Interrupted: stopped at once on a second Ctrl-C, without saving; {kept}.",
          file=sys.stderr, flush=True)
    os._exit(errors.INTERRUPTED)  # pylint: disable=protected-access

  def callback(self, fn, *args):
    """Calls `fn(*args)` when the session closes (before the lock is released)."""
    self._stack.callback(fn, *args)

  def check_model(self, record: Dict[str, Any]) -> None:
    check_same_model(self.workdir, record)

  def start(self, step: int, config, record: Dict[str, Any]) -> None:
    """Records this start: model.json, and config.json with its `starts` entry."""
    if jax.process_index() == 0:
      run_record.write_model_file(self.workdir, record)
      previous = run_record.read(self.workdir) if step else None
      run_record.write(self.workdir, config, run_record.start_entry(
          step, jax.process_count(), jax.device_count(), jax.devices()[0].device_kind,
          self.accepted), previous)
    logging.info("Config (recorded in %s):\n%s", os.path.join(self.workdir, run_record.FILE),
                 "\n".join(f"  {k} = {v!r}"
                           for k, v in sorted(run_record.flat_config(config).items())))

  @property
  def preemption(self) -> PreemptionWatcher:
    """The run's watcher, its signal handlers installed on first use (the loop's)."""
    if self._preemption is None:
      self._preemption = PreemptionWatcher(self.mesh, self._second_interrupt)
      self.callback(self._preemption.close)
    return self._preemption


@contextlib.contextmanager
def session(config, workdir: str, mesh, accept_changes=(), outcome=None):
  """The run's workdir prepared, locked and its record checked; see the module doc.
  `outcome`: a dict the session fills (`run.outcome`), readable after an exception."""
  prepare_workdir(workdir)
  with contextlib.ExitStack() as stack:
    stack.callback(lock_workdir(workdir, mesh).release)
    yield Session(config, workdir, mesh, accept_changes, stack, outcome)
