"""host_memory.py: keep_freed_memory(), called first in an entry point's main(), keeps
freed host memory, so that XLA on CPU stops mapping its temporary buffers afresh (and
page-faulting through them) every call. Importing mixer_jax changes nothing.

Each check runs in a fresh interpreter: the malloc settings are per process and must be
made before JAX starts its threads, which this pytest process did long ago.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted program whose temporaries (h and tanh(h), 64 MiB each) are larger than the
# 64 MiB per-thread malloc heaps, so that glibc's default serves them with mmap. After
# warm-up calls, each further call's minor page faults are printed. As in an entry point,
# jax is imported at the top and the settings are made first thing in main(), before JAX
# starts its backend and threads.
_PROGRAM = r"""
import json, resource
import jax, jax.numpy as jnp
from mixer_jax import host_memory
host_memory.keep_freed_memory()

@jax.jit
def f(x, w, v):
  h = x @ w                       # (4096, 4096) float32: a 64 MiB temporary.
  return jnp.tanh(h) @ v

k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(k1, (4096, 8))
w = jax.random.normal(k2, (8, 4096))
v = jax.random.normal(k3, (4096,))
for _ in range(3):
  jax.block_until_ready(f(x, w, v))
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x, w, v))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": host_memory.applied(), "faults": faults}))
"""

_TEMP_PAGES = 64 * 2 ** 20 // 4096  # Pages of one 64 MiB temporary.


def _run(keep: str):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MIXER_JAX_KEEP_HOST_MEMORY=keep)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _PROGRAM], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _glibc():
  try:
    import ctypes
    ctypes.CDLL(None).mallopt  # noqa: B018
    return sys.platform.startswith("linux")
  except (OSError, AttributeError):
    return False


@pytest.mark.skipif(not _glibc(), reason="the malloc settings exist only in glibc")
def test_kept_memory_stops_the_per_call_page_faults():
  kept, default = _run("1"), _run("0")
  assert kept["applied"] is True and default["applied"] is False
  # Default glibc: every call maps its temporary afresh and faults through it.
  assert min(default["faults"]) > _TEMP_PAGES // 2, default
  # Kept: freed blocks are reused. The heap can take a few calls to settle (a block may
  # land where the next call's temporary wanted to go), so most calls, not all, must be
  # nearly free of faults.
  quiet = [f for f in kept["faults"] if f < _TEMP_PAGES // 10]
  assert len(quiet) >= len(kept["faults"]) // 2, kept
  assert sum(kept["faults"]) * 2 < sum(default["faults"]), (kept, default)


# Two 1.25 GB blocks freed together leave a free heap top above 2 GiB, which glibc
# trims unless trimming is off altogether; the third block then faults afresh.
_BIG_BLOCKS = r"""
import ctypes, json, resource
from mixer_jax import host_memory
host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 1250 * 2 ** 20
blocks = [libc.malloc(size) for _ in range(2)]
for b in blocks:
  ctypes.memset(b, 1, size)
for b in reversed(blocks):
  libc.free(b)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = libc.malloc(size)
ctypes.memset(b, 1, size)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(not _glibc(), reason="the malloc settings exist only in glibc")
def test_heap_is_not_trimmed_even_above_two_gigabytes():
  env = dict(os.environ, JAX_PLATFORMS="cpu", MIXER_JAX_KEEP_HOST_MEMORY="1")
  proc = subprocess.run([sys.executable, "-c", _BIG_BLOCKS], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  faults = json.loads(proc.stdout.strip().splitlines()[-1])["faults"]
  assert faults < 1250 * 2 ** 20 // 4096 // 10, faults  # Reused, not mapped afresh.


@pytest.mark.parametrize("keep, platforms, expected", [
    ("off", "cpu", False),          # Opted out.
    ("auto", "cuda,cpu", False),    # Accelerator: the step's buffers are not on the host.
    ("auto", "tpu", False),
    ("1", "tpu", True),             # Forced on.
])
def test_when_it_applies(keep, platforms, expected):
  # Importing changes nothing; the call decides, and a second call returns the same.
  code = ("import mixer_jax; from mixer_jax import host_memory; print(host_memory.applied(), "
          "host_memory.keep_freed_memory(), host_memory.keep_freed_memory())")
  env = dict(os.environ, MIXER_JAX_KEEP_HOST_MEMORY=keep, JAX_PLATFORMS=platforms)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  expected = expected and _glibc()
  assert proc.stdout.split() == ["False", str(expected), str(expected)]
