"""Keeps freed host memory for reuse, so that XLA on CPU does not page-fault every step.

Why: XLA's CPU runtime allocates each execution's temporary buffer afresh (918 MB for
the Mixer-S/32 train step at batch 32) with posix_memalign from its worker threads.
glibc serves a block that large with mmap and hands it back with munmap when the step
ends, so the next step maps it again and the kernel zero-fills every 4 KiB page on
first touch: 240,000 page faults and 0.45 CPU-seconds of kernel time per step, 13 % of
the step's wall time on the 2-core development machine (BENCHMARKS.md). PyTorch avoids
this with its caching allocator; XLA's CPU client has none.

What: three glibc `mallopt` settings, made before JAX starts its threads -- one malloc
arena (worker threads then allocate from the main heap, which can grow without
limit, instead of from per-thread heaps capped at 64 MiB that fall back to mmap), no
mmap for large blocks, and no trimming of the heap's free top. A freed step buffer then
stays mapped and the next step reuses it: no page faults, no kernel time. The cost: the
process keeps its peak host memory instead of returning it to the OS, as a caching
allocator does.

When: an entry point calls keep_freed_memory() first thing in main(), before JAX starts
its backend and threads (importing jax at the top of the module is fine; importing
mixer_jax changes nothing). It applies if JAX will compute on the CPU: `JAX_PLATFORMS` is
`cpu`, or unset with no accelerator plugin installed (no `jax_plugins` package, no
`libtpu`). On GPU and TPU hosts the
step's buffers live in device memory, and one malloc arena would only make tf.data's
many threads contend for one lock. `MIXER_JAX_KEEP_HOST_MEMORY=1` forces it on, `=0`
off. On systems without glibc (macOS, musl) it does nothing.

Known cost with TensorFlow in the same process (main's input pipeline): tf.data's
allocations share the one heap with XLA's step buffer, so the heap grows to hold both
(peak RSS about 5 GB for S/32 at batch 32, against 2.6 GB without tf.data); after that,
fed steps run with next to no page faults (BENCHMARKS.md, end-to-end rows).
"""

import ctypes
import importlib.util
import os
import sys

ENV_VAR = "MIXER_JAX_KEEP_HOST_MEMORY"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# -1 turns trimming off for good (mallopt(3)). Not the largest int: glibc would still
# trim a free heap top above 2 GiB, and two 1 GB step buffers freed together leave one.
_NEVER = -1

_applied = None


def keep_freed_memory() -> bool:
  """Applies the settings once; True if they are in effect in this process."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  wanted = os.environ.get(ENV_VAR, "auto").strip().lower()
  if wanted in ("0", "false", "no", "off"):
    return False
  if wanted not in ("1", "true", "yes", "on") and not computes_on_cpu():
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # glibc's, already loaded in this process.
  except (OSError, AttributeError):
    return False  # Not glibc (e.g. musl has no mallopt).
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success, 0 on error.
  _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                  and mallopt(_M_TRIM_THRESHOLD, _NEVER))
  return _applied


def computes_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without starting JAX."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for accelerator_package in ("jax_plugins", "libtpu"):  # CUDA/ROCm plugins; TPU.
    try:
      if importlib.util.find_spec(accelerator_package) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def applied() -> bool:
  """Whether keep_freed_memory() is in effect (for benchmark reports)."""
  return bool(_applied)
