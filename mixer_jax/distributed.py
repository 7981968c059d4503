"""Multi-process setup: `jax.distributed.initialize` for every kind of cluster, and
what happens when one process of a run fails.

- Cloud TPU pods and SLURM: detected by JAX itself (no flags).
- Other clusters and local multi-process runs: --coordinator_address,
  --num_processes, --process_id.
- CPU: cross-process collectives go through gloo.

Failure of one process (the bound the README documents):
- The survivors' next collective fails at once where the transport notices (gloo's
  TCP connections close when a local peer dies); `exit_now` then prints one line and
  ends the process with `PROCESS_FAILED`, skipping JAX's shutdown barrier, which would
  otherwise wait for the dead process.
- Otherwise (a vanished host, a hung peer, NCCL collectives that never return), the
  coordination service declares a process dead after `heartbeat_timeout_s` without a
  heartbeat and JAX ends every other process ("Terminating process because the JAX
  distributed service detected fatal errors"; exit status 134). A dead process 0 (the
  coordinator) is noticed by the others the same way, or sooner when its port closes.
So a surviving process exits non-zero within `heartbeat_timeout_s` plus a few seconds.
A process that never starts makes the others give up after `init_timeout_s`.

Preemption: workdir.PreemptionWatcher owns SIGTERM (see there); JAX's own preemption
service, which would install a competing C++ SIGTERM handler, is switched off here.
"""

import os
import sys
import threading
import traceback

from absl import logging
import jax

# Exit status of a process that stopped because it, or another process of the run,
# failed at run time (errors.py has 2 for input problems and 3 for non-finite losses).
PROCESS_FAILED = 4

# Leading words of XLA runtime errors (absl status codes): a failed collective or a
# lost coordination service looks like "UNKNOWN: Gloo AllReduce failed: ...".
_RUNTIME_STATUS = ("UNKNOWN", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "ABORTED",
                   "CANCELLED", "DATA_LOSS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED")


class ProcessFailure(RuntimeError):
  """This process, or another one of the run, failed; every process stops."""


def _cluster_detected() -> bool:
  """True where JAX's own cluster detection applies and there is more than one task."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address=None, num_processes=None, process_id=None, *,
               heartbeat_timeout_s: int = 30, init_timeout_s: int = 120) -> None:
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError("Pass --coordinator_address, --num_processes and --process_id "
                     "together (or none of them, on Cloud TPU pods and SLURM).")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
  if heartbeat_timeout_s < 1 or init_timeout_s < 1:
    raise ValueError(f"--heartbeat_timeout_s={heartbeat_timeout_s} and --init_timeout_s="
                     f"{init_timeout_s} must be positive numbers of seconds.")
  if not (coordinator_address or _cluster_detected()):
    return  # One process: nothing to set up.
  if num_processes == 1:
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU devices talk across processes through gloo (no-op for accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # SIGTERM belongs to workdir.PreemptionWatcher: JAX's preemption service would install
  # its own C++ handler, and its sync point (the largest step any process reported,
  # plus one) is never reached by a resumed run notified before its first step.
  jax.config.update("jax_enable_preemption_service", False)
  # JAX aborts the process (C++ fatal error, a page of stack) when peers do not join in
  # time; a watchdog that fires first turns that into one sentence and exit code 2.
  watchdog = threading.Timer(init_timeout_s, _never_joined,
                             (coordinator_address, num_processes, init_timeout_s))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=init_timeout_s + 30,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  finally:
    watchdog.cancel()


def _never_joined(address, num_processes, timeout_s):
  where = f"the coordinator at {address}" if address else "the coordinator"
  count = f"all {num_processes} processes" if num_processes else "all processes"
  print(f"Error: Not {count} joined {where} within {timeout_s} s; start the same command "
        "on every host (each with its own --process_id), or raise --init_timeout_s.",
        file=sys.stderr, flush=True)
  os._exit(2)


def is_runtime_failure(error: BaseException) -> bool:
  """A failed collective, device or coordination RPC (not a mistake in the input)."""
  if isinstance(error, jax.errors.JaxRuntimeError):
    return True
  # Gloo failures surface as plain ValueError("UNKNOWN: Gloo ... failed: ...").
  return str(error).split(":", 1)[0].strip() in _RUNTIME_STATUS


def failure(error: BaseException) -> ProcessFailure:
  """The one-sentence ProcessFailure for a runtime error of a multi-process run."""
  first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
  return ProcessFailure(
      f"Process {jax.process_index()} of {jax.process_count()} stopped on a runtime "
      f"error ({first}); where it names a collective or the coordination service, "
      "another process of the run has usually died (see its log). Every process stops; "
      "rerun the same command on every host to resume from the last checkpoint.")


def exit_now(error: BaseException) -> None:
  """Multi-process runs: ends this process at once with `error`'s exit status.

  Returns (doing nothing) in single-process runs. `SystemExit` keeps its status (its
  message is already printed); `ProcessFailure` prints its sentence and exits with
  PROCESS_FAILED; anything else prints its traceback and exits 1. `os._exit` skips
  JAX's shutdown barrier, which waits for every process and would hold a survivor
  until the heartbeat timeout, or a healthy peer for the shutdown timeout (5 minutes).
  """
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  if isinstance(error, SystemExit):
    code = error.code
    if code is not None and not isinstance(code, int):
      print(code, file=sys.stderr)
      code = 1
    code = code or 0
  elif isinstance(error, ProcessFailure):
    print(f"Error: {error}", file=sys.stderr)
    code = PROCESS_FAILED
  else:
    traceback.print_exception(type(error), error, error.__traceback__)
    code = 1
  try:
    logging.flush()
  except Exception:  # Logging must not keep a failed process alive.
    pass
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
