r"""A run's recorded config: `configs/recorded.py:WORKDIR` (or `:WORKDIR/config.json`).

Every training run writes its full resolved config to `WORKDIR/config.json`
(mixer_jax/run_record.py); this file reads it back, so the workdir alone reproduces
the run:

  python -m mixer_jax.main --config=configs/recorded.py:/tmp/mixer_digits \
      --workdir=/tmp/mixer_digits_again

Command-line overrides apply on top, as with any config file.
"""

import json
import os

from configs import common


def get_config(path: str = ""):
  if not path:
    raise ValueError("configs/recorded.py needs a workdir: --config=configs/recorded.py:WORKDIR.")
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist; pass a training workdir (it holds config.json).")
  with open(path) as f:
    recorded = json.load(f)["config"]
  c = common.base_config()
  for key, value in recorded.items():
    *parents, leaf = key.split(".")
    node = c
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise ValueError(f"{path} records config key {key!r}, which this version does not "
                       "have; use the codebase version named in its 'starts'.")
    node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
  return c
