"""mixer_jax: MLP-Mixer in JAX/Flax."""

import os as _os
import sys as _sys

# Config files import `configs.common` (the repository's configs/ folder): make the
# repository root importable wherever the entry points are started from.
_REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _REPO_ROOT not in _sys.path:
  _sys.path.insert(0, _REPO_ROOT)

# Before anything starts JAX's threads: keep freed host memory for reuse, which saves
# XLA on CPU a page-fault storm every step (see host_memory.py; opt out with
# MIXER_JAX_KEEP_HOST_MEMORY=0).
from mixer_jax import host_memory as _host_memory  # noqa: E402
_host_memory.keep_freed_memory()
