"""Multi-process setup: `jax.distributed.initialize` for every kind of cluster.

- Cloud TPU pods and SLURM: detected by JAX itself (no flags).
- Other clusters and local multi-process runs: --coordinator_address,
  --num_processes, --process_id.
- CPU: cross-process collectives go through gloo.

A dead process is noticed by the coordination service after `heartbeat_timeout_s`
without a heartbeat; the surviving processes then fail their next collective and
exit non-zero instead of hanging. A process that never starts makes the others
give up after `init_timeout_s`.
"""

import os

import jax


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
  if not (coordinator_address or _cluster_detected()):
    return  # One process: nothing to set up.
  if num_processes == 1:
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU devices talk across processes through gloo (no-op for accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=init_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
