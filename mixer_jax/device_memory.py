"""Does the train step fit the devices' memory? Asked of XLA before anything runs.

`compiled_train_step` compiles the train step ahead of time from abstract shapes (as
tools/memory.py does, here on the run's own devices), reads XLA's memory analysis of
the compiled program and refuses, in one sentence with the estimate, a step whose peak
exceeds what a device has: an accelerator's `memory_stats()` limit, or for CPU
devices the host's available RAM shared among them. The compiled step is the one the
loop then runs, so the check costs no second compile.
"""

import os
from typing import Optional, Tuple

import jax

from mixer_jax import errors

GIB = 2 ** 30


def peak_bytes(stats) -> int:
  """Arguments + temporaries + outputs not written in place of donated inputs: an upper
  bound of what the compiled step holds at once on one device."""
  outputs = int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes)
  return int(stats.argument_size_in_bytes) + int(stats.temp_size_in_bytes) + max(outputs, 0)


def host_available_bytes() -> Optional[int]:
  """MemAvailable of /proc/meminfo (free plus reclaimable), else free physical pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def available_per_device() -> Optional[Tuple[int, str]]:
  """(bytes one local device may use, where that figure comes from), or None if unknown."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # Backends without the query.
    stats = None
  if stats and stats.get("bytes_limit"):
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"each {device.device_kind} device has"
  if device.platform == "cpu":
    host = host_available_bytes()
    if host:
      count = jax.local_device_count()
      share = f" (shared by {count} CPU devices)" if count > 1 else ""
      return host // count, f"the host has{share}"
  return None


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / GIB:,.2f} GiB"


def check_fits(stats, batch_size: int, available: Optional[Tuple[int, str]]) -> None:
  """ConfigError if the compiled step's peak (`stats`: XLA's memory analysis) exceeds
  the available bytes per device."""
  if stats is None or available is None:
    return
  peak, (free, where) = peak_bytes(stats), available
  if peak <= free:
    return
  raise errors.ConfigError(
      f"config.batch_size={batch_size} needs an estimated {_gib(peak)} per device for the "
      f"train step ({_gib(int(stats.argument_size_in_bytes))} state and batch, "
      f"{_gib(int(stats.temp_size_in_bytes))} temporaries; XLA's memory analysis) but "
      f"{where} {_gib(free)} available; use a smaller --config.batch_size, or "
      "--config.grad_accum_steps=K, --config.sharding=fsdp or "
      "--config.model.remat_policy=full.")


def compiled_train_step(setup, batch_size: int):
  """The run's train step compiled for global batches of `batch_size`, checked to fit.

  Called like `setup.train_step()`'s (state, batch) -> (state, metrics); the same
  program, compiled once, here."""
  compiled = setup.train_step().lower(setup.abstract_state,
                                      setup.abstract_batch(batch_size)).compile()
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend reports it.
    stats = None
  check_fits(stats, batch_size, available_per_device())
  return compiled
