"""mixer_jax: MLP-Mixer in JAX/Flax."""

import os as _os
import sys as _sys

# Config files import `configs.common` (the repository's configs/ folder): make the
# repository root importable wherever the entry points are started from.
_REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _REPO_ROOT not in _sys.path:
  _sys.path.insert(0, _REPO_ROOT)
