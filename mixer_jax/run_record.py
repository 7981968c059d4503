"""The run's record: `WORKDIR/config.json`, and what a resume may change.

At every start the workdir gets the full resolved config (every key), the command
line, package versions, process and device counts; `config.json` plus the README's
command reproduces the run. A resume is compared with the record first:

- keys that only observe the run (`EXTEND_OR_OBSERVE`: the log/eval/checkpoint
  intervals, how many checkpoints are kept) or only choose how it executes (`EXECUTION`: the
  mesh, sharding, kernels, remat policy, scanned or unrolled blocks; the data order
  does not depend on them, the numbers at most to float32 rounding, and scanned and
  unrolled runs write the same checkpoint files) may change; each change is logged;
- any other change (the model, the data stream, the optimiser's trajectory) is
  refused, naming each key with its old and new value, unless it is accepted
  deliberately with `--accept_changes=KEY[,KEY...]` (or `all`); accepted changes are
  appended to the record's `starts`. The run's length (`LENGTH`: `num_train_steps`,
  `num_epochs`) is such a key: the learning-rate schedule is built over the whole run,
  so a new length rebuilds it (a warm restart at the resume step, not a continuation),
  and the refusal says which rate the resume step would get.

A record that exists must be a JSON object whose `config` is an object; a malformed
one is one sentence, never rebuilt silently (workdir.py also checks a resume whose
`config.json` is missing against the config its checkpoints carry).
"""

import datetime
import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from mixer_jax import errors

FILE = "config.json"

LENGTH = ("num_train_steps", "num_epochs")
# Not config keys: `--accept_changes=restart` starts a workdir over whose every
# checkpoint was unreadable (workdir.py); `all` accepts every change.
SPECIAL_ACCEPTS = ("all", "restart")
EXTEND_OR_OBSERVE = frozenset((
    "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "log_image_grid", "eval_batch_size",
    "fewshot_every_steps", "fewshot_shots", "fewshot_train_split", "fewshot_layer"))
EXECUTION = frozenset((
    "mesh_model", "sharding", "fsdp_min_size", "model.kernels", "model.scan",
    "model.remat_policy", "data_dir", "manual_dir", "cache_train"))
# Filled by state.resolve_model from the keys that are compared (variant and sizes).
DERIVED = frozenset(("model.name", "model.family"))
# Keys whose default is resolved at the start (state.resolve_randaugment_on) -> the
# value that reproduces runs recorded before the key existed (they augmented on the host).
BEFORE_THE_KEY = {"randaugment_on": "host"}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu",
            "tensorflow", "tensorflow-datasets", "ml_collections", "clu")


MODEL_FILE = "model.json"  # What the checkpoints are of: fields, classes, image size.


def read_model_file(workdir: str):
  path = os.path.join(workdir, MODEL_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_model_file(workdir: str, info: Mapping[str, Any]) -> None:
  path = os.path.join(workdir, MODEL_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


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
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise TypeError("not a JSON object with a 'config' object")
    if not isinstance(record.get("starts", []), list):
      raise TypeError("its 'starts' is not a list")
    return record
  except (ValueError, TypeError, OSError) as e:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise errors.WorkdirError(
        f"{path} is not a readable run record ({type(e).__name__}: {why}); restore it from a "
        "backup, or move it aside (a resume then checks the config its checkpoints "
        "carry).") from None


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
  try:  # Here, not at the top: an installed mixer_jax may run without configs/.
    from configs import common
  except ImportError:
    return {}
  return flat_config(common.base_config())


def parse_accept(value: str) -> List[str]:
  return [k.strip().removeprefix("config.") for k in (value or "").split(",") if k.strip()]


def check_resume(record: Dict[str, Any], config, accept: Sequence[str], workdir: str,
                 step: Optional[int] = None,
                 learning_rate: Optional[Callable[[Mapping[str, Any], int], Optional[float]]]
                 = None) -> Dict[str, tuple]:
  """Compares a resumed run's config with its record.

  Returns the changes (allowed or accepted), for the log and the record; raises
  `errors.WorkdirError` naming every refused key with its old and new value. `step`
  (the resume step) and `learning_rate(flat_config, step)` (the schedule's rate, None
  when the length is not known here) let a refused change of the run's length say
  what accepting it does to the learning rate.
  """
  current = flat_config(config)
  found = changes(record["config"], current)
  # Keys the codebase gained or lost since the record was written: a gained key at its
  # default keeps the recorded run's behaviour, and a lost key is read by nothing.
  defaults = _defaults()
  for key in list(found):
    old, new = found[key]
    gained = key not in record["config"] and key in defaults and (
        new == defaults[key] or new == BEFORE_THE_KEY.get(key))
    if gained or key not in current or key in DERIVED:
      del found[key]
    # Records written before the model resolved its fields hold 0 for "the variant's
    # own value": the same model while the variant is unchanged.
    elif (key.startswith("model.") and type(old) is int and old == 0  # Not False.
          and new is not None and "model.variant" not in found):
      del found[key]
  # With a fixed step count the epoch count is read by nothing (train.total_train_steps).
  if "num_epochs" in found and found.get("num_train_steps") is None and (
      current.get("num_train_steps") or 0) > 0:
    del found["num_epochs"]
  unknown = [k for k in accept if k not in SPECIAL_ACCEPTS and k not in found]
  if unknown:
    raise errors.ConfigError(
        f"--accept_changes names {', '.join(unknown)}, which the resumed config does not "
        f"change (it changes {', '.join(found) or 'nothing'}); name only changed keys.")
  refused = {k: v for k, v in found.items()
             if k not in EXTEND_OR_OBSERVE | EXECUTION and k not in accept
             and "all" not in accept}
  if refused:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    if any(k in LENGTH for k in refused):
      listed += length_note(record["config"], current, step, learning_rate)
    raise errors.WorkdirError(
        f"Resuming {workdir} with a config that changes the run ({listed}); use the recorded "
        f"config ({os.path.join(workdir, FILE)}), a new --workdir, or accept it deliberately "
        f"with --accept_changes={','.join(refused)}.")
  return found


def length_note(recorded: Mapping[str, Any], current: Mapping[str, Any],
                step: Optional[int], learning_rate) -> str:
  """What a new run length does to the learning rate, for the refusal's sentence."""
  rates = None
  if step is not None and learning_rate is not None:
    rates = learning_rate(recorded, step), learning_rate(current, step)
  if rates is None or None in rates:
    return (": accepting a new length rebuilds the learning-rate schedule over it, so the "
            "rate jumps at the resume step (a warm restart, not a continuation)")
  return (f": accepting it rebuilds the learning-rate schedule over the new length, so the "
          f"rate at the resume step {step} becomes {rates[1]:.4g} instead of the recorded "
          f"schedule's {rates[0]:.4g} (a warm restart, not a continuation)")
