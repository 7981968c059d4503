"""The run's record: `WORKDIR/config.json`, and what a resume may change.

At every start the workdir gets the full resolved config (every key), the command
line, package versions, process and device counts; `config.json` plus the README's
command reproduces the run. A resume is compared with the record first:

- keys that only extend or observe the run (`EXTEND_OR_OBSERVE`: more steps, the
  log/eval/checkpoint intervals) or only choose how it executes (`EXECUTION`: the
  mesh, sharding, kernels, remat policy, scanned or unrolled blocks; the data order
  does not depend on them, the numbers at most to float32 rounding, and scanned and
  unrolled runs write the same checkpoint files) may change; each change is logged;
- any other change (the model, the data stream, the optimiser's trajectory) is
  refused, naming each key with its old and new value, unless it is accepted
  deliberately with `--accept_changes=KEY[,KEY...]` (or `all`); accepted changes are
  appended to the record's `starts`.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mixer_jax import errors

FILE = "config.json"

EXTEND_OR_OBSERVE = frozenset((
    "num_train_steps", "num_epochs", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "log_image_grid", "eval_batch_size",
    "fewshot_every_steps", "fewshot_shots", "fewshot_train_split"))
EXECUTION = frozenset((
    "mesh_model", "sharding", "fsdp_min_size", "model.kernels", "model.scan",
    "model.remat_policy", "data_dir", "manual_dir", "cache_train"))
# Filled by state.resolve_model from the keys that are compared (variant and sizes).
DERIVED = frozenset(("model.name", "model.family"))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu",
            "tensorflow", "tensorflow-datasets", "ml_collections", "clu")


def flat_config(config) -> Dict[str, Any]:
  """{dotted key: JSON value} of a ConfigDict (or a nested dict); tuples as lists."""
  items = config.items() if hasattr(config, "items") else config
  flat = {}
  for key, value in items:
    if hasattr(value, "items"):
      flat.update({f"{key}.{k}": v for k, v in flat_config(value).items()})
    else:
      flat[key] = list(value) if isinstance(value, tuple) else value
  return flat


def _versions() -> Dict[str, str]:
  found = {}
  for name in PACKAGES:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  found["python"] = sys.version.split()[0]
  return found


def _commit() -> Optional[str]:
  """The checkout's git commit (with '+changes' if it has uncommitted edits)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  if head.returncode:
    return None
  return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def start_entry(step: int, processes: int, devices: int, device_kind: str,
                accepted: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """What one start of the run was: when, where, by which command, on what."""
  entry = dict(step=step, time=datetime.datetime.now().astimezone().isoformat(
      timespec="seconds"), host=socket.gethostname(), command=list(sys.argv),
               commit=_commit(), versions=_versions(), processes=processes, devices=devices,
               device_kind=device_kind)
  if accepted:
    entry["accepted_changes"] = dict(accepted)
  return entry


def read(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    record["config"]  # pylint: disable=pointless-statement
    return record
  except (ValueError, KeyError, TypeError) as e:
    raise errors.WorkdirError(
        f"{path} is not a readable run record ({type(e).__name__}: {e}); restore it from a "
        "backup, or move it aside to start the record afresh.") from None


def write(workdir: str, config, start: Dict[str, Any],
          previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Writes the record (atomically): the current config and every start so far."""
  record = dict(config=flat_config(config),
                starts=(previous or {}).get("starts", []) + [start])
  path = os.path.join(workdir, FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)
  return record


def changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, tuple]:
  """{key: (old, new)} for every key whose value differs (absent keys: None)."""
  keys = sorted(set(recorded) | set(current))
  return {k: (recorded.get(k), current.get(k)) for k in keys
          if recorded.get(k) != current.get(k)}


def _defaults() -> Dict[str, Any]:
  """Every key's default (configs/common.py), or {} where configs/ is not importable."""
  try:
    from configs import common
  except ImportError:
    return {}
  return flat_config(common.base_config())


def parse_accept(value: str) -> List[str]:
  return [k.strip().removeprefix("config.") for k in (value or "").split(",") if k.strip()]


def check_resume(record: Dict[str, Any], config, accept: Sequence[str],
                 workdir: str) -> Dict[str, tuple]:
  """Compares a resumed run's config with its record.

  Returns the changes (allowed or accepted), for the log and the record; raises
  `errors.WorkdirError` naming every refused key with its old and new value.
  """
  current = flat_config(config)
  found = changes(record["config"], current)
  # Keys the codebase gained or lost since the record was written: a gained key at its
  # default keeps the recorded run's behaviour, and a lost key is read by nothing.
  defaults = _defaults()
  for key in list(found):
    old, new = found[key]
    gained = key not in record["config"] and key in defaults and new == defaults[key]
    if gained or key not in current or key in DERIVED:
      del found[key]
  unknown = [k for k in accept if k != "all" and k not in found]
  if unknown:
    raise errors.ConfigError(
        f"--accept_changes names {', '.join(unknown)}, which the resumed config does not "
        f"change (it changes {', '.join(found) or 'nothing'}); name only changed keys.")
  refused = {k: v for k, v in found.items()
             if k not in EXTEND_OR_OBSERVE | EXECUTION and k not in accept
             and "all" not in accept}
  if refused:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise errors.WorkdirError(
        f"Resuming {workdir} with a config that changes the run ({listed}); use the recorded "
        f"config ({os.path.join(workdir, FILE)}), a new --workdir, or accept it deliberately "
        f"with --accept_changes={','.join(refused)}.")
  return found
