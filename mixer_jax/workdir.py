"""A run's housekeeping in its workdir, behind one context: `session`.

    with workdir.session(config, workdir, mesh, accept_changes) as run:
      ...                                # run.saved_steps, run.check_model(record)
      run.start(step, config, record)    # model.json and config.json, once resumed
      stop = run.preemption.should_stop(step)

On entry: the workdir is created and probed for writing, process 0 takes its lock
(workdir_lock.py) for the whole run, and a resumed run's config is compared with its
record (run_record.py), refusing changes that alter the run. On exit, in reverse
order: whatever the run registered (`run.callback`: checkpoints, metric writer), the
preemption watcher's signal handlers, the lock.
"""

import collections
import contextlib
import os
import signal
from typing import Any, Dict

import jax
from absl import logging

from mixer_jax import checkpoint
from mixer_jax import errors
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


class Session:
  """One run in its workdir (see the module doc); made by `session`."""

  def __init__(self, config, workdir: str, mesh, accept_changes, stack):
    self.workdir, self.mesh, self._stack = workdir, mesh, stack
    self.saved_steps = checkpoint.saved_steps(workdir)
    self.accepted = check_record(workdir, config, bool(self.saved_steps), accept_changes)
    self._preemption = None

  def callback(self, fn, *args):
    """Calls `fn(*args)` when the session closes (before the lock is released)."""
    self._stack.callback(fn, *args)

  def check_model(self, record: Dict[str, Any]) -> None:
    check_same_model(self.workdir, record)

  def start(self, step: int, config, record: Dict[str, Any]) -> None:
    """Records this start: model.json, and config.json with its `starts` entry."""
    if jax.process_index() == 0:
      checkpoint.write_model_file(self.workdir, record)
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
      self._preemption = PreemptionWatcher(self.mesh)
      self.callback(self._preemption.close)
    return self._preemption


@contextlib.contextmanager
def session(config, workdir: str, mesh, accept_changes=()):
  """The run's workdir prepared, locked and its record checked; see the module doc."""
  prepare_workdir(workdir)
  with contextlib.ExitStack() as stack:
    stack.callback(lock_workdir(workdir, mesh).release)
    yield Session(config, workdir, mesh, accept_changes, stack)
