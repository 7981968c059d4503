"""User errors at the entry points: one sentence on stderr and a non-zero exit.

The loop and services raise ordinary exceptions (ValueError subclasses for anything
a user can fix); only entry points turn them into an exit code, so nothing in the
library calls sys.exit. `--traceback` shows the full trace instead.
"""

import sys

# Exit codes: 2 for a problem in the input (config, data, paths, checkpoints),
# 3 for a run that stopped itself (non-finite loss).
USER_ERROR = 2
STOPPED = 3


def run_guarded(fn, show_traceback: bool = False):
  from mixer_jax import train  # Local: keeps `--help` fast.
  try:
    return fn()
  except train.NonFiniteError as e:
    if show_traceback:
      raise
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(STOPPED)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    if show_traceback:
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"Error: {message} (run with --traceback for details)", file=sys.stderr)
    sys.exit(USER_ERROR)
