"""Paths a user gives, resolved once where they enter (the entry points).

`~` is expanded and a relative path is made absolute against the working directory,
so `--workdir=runs/x` means the same thing to orbax (which needs absolute paths), TFDS
and the log. URLs (`gs://...`) and hub names (`hf-hub:ORG/REPO`) pass through unchanged.
"""

import os

# Config keys that hold paths; `dataset` holds one after "folder:".
CONFIG_KEYS = ("data_dir", "manual_dir", "init_from")
FOLDER_PREFIX = "folder:"
HUB_PREFIX = "hf-hub:"  # hub.PREFIX


def resolve(path: str) -> str:
  """Absolute form of a local path ('', URLs and hf-hub: names unchanged)."""
  if not path or "://" in path or path.startswith(HUB_PREFIX):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config(config):
  """Resolves the config's path keys in place; returns {key: absolute path} changed."""
  changed = {}
  for key in CONFIG_KEYS:
    value = config.get(key, "")
    if resolve(value) != value:
      config[key] = changed[key] = resolve(value)
  dataset = config.get("dataset", "")
  if dataset.startswith(FOLDER_PREFIX):
    root = dataset[len(FOLDER_PREFIX):]
    if resolve(root) != root:
      config["dataset"] = changed["dataset"] = FOLDER_PREFIX + resolve(root)
  return changed
