r"""Per-device memory of the train step on N devices, from a compile that never runs.

  python -m mixer_jax.tools.memory --config=configs/imagenet21k_pretrain.py:L/16 \
      --num_devices=256 --num_classes=21843
  python -m mixer_jax.tools.memory --config=configs/default.py --num_devices=8 \
      --config.fsdp_min_size=0 --strategies=replicate,fsdp
  python -m mixer_jax.tools.memory --config=configs/imagenet21k_pretrain.py:L/16 \
      --config.model.variant=H/14 --num_classes=21843 --num_devices=64 \
      --config.model.scan=True --remat_policies=none,full,dots_saveable

Simulates N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set
before JAX starts; the tool re-executes itself when JAX already runs with another
device count), builds the trainer's train step (steps.make_train_step, jitted with
sharding.py's shardings and the state donated, as train.py does) from abstract shapes
only (jax.eval_shape, ShapeDtypeStructs carrying shardings), compiles it with
`.lower(...).compile()` and prints, per device, sharding strategy and remat policy
(`--remat_policies`; default: the config's `model.remat_policy`; `--config.model.scan`
picks unrolled or scanned blocks):

  params, opt_state  this device's shards of the parameters / optimiser state,
                     computed exactly from each array's shard shape (no compile needed).
  batch              this device's slice of the global batch (computed likewise).
  arguments          measured: XLA's memory analysis of the compiled program, all inputs
                     (checked to equal params + opt_state + step + batch).
  temporaries        measured: XLA's memory analysis, buffers live inside the step
                     (activations, gradients, collective buffers).
  peak               arguments + temporaries + outputs not written in place of donated
                     inputs: an upper bound of what the step holds at once.

Nothing is allocated and no TensorFlow is imported. The temporaries are XLA:CPU's
buffer assignment of the SPMD-partitioned program: TPU/GPU compilers fuse, lay out
and keep bfloat16 differently, so read them as indicative; the parameter, optimiser
and batch bytes hold on any backend. The last stdout line is one JSON object.
"""

import json
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mixer_jax import errors
# JAX, and every module that imports it, is imported inside the functions: the device
# count (XLA_FLAGS) must be set before JAX starts, and ensure_devices() tells from
# whether jax is in sys.modules if it can still set it or must re-execute the tool.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (path[:argument]).",
                                lock_config=True)
flags.DEFINE_integer("num_devices", None, "Number of (simulated) devices to compile for.")
flags.DEFINE_integer("num_classes", 0,
                     "Classes of the head; 0 = config.num_classes, or 1000 where that is 0 "
                     "(the tool never reads the dataset).")
flags.DEFINE_string("strategies", "replicate,fsdp", "Comma-separated sharding strategies.")
flags.DEFINE_string("remat_policies", "",
                    "Comma-separated remat policies to measure each strategy under "
                    "(none, full, dots_saveable, ...); empty = config.model.remat_policy.")

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ------------------------------------------------------------ simulated devices
def simulation_env(num_devices: int, env=None) -> dict:
  """The environment under which JAX starts with `num_devices` CPU devices."""
  env = dict(os.environ if env is None else env)
  kept = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{kept} {_DEVICE_COUNT_FLAG}={num_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def ensure_devices(num_devices: int, argv) -> None:
  """Sets up `num_devices` CPU devices before JAX starts, or re-executes this tool."""
  if "jax" not in sys.modules:
    os.environ.update(simulation_env(num_devices))
    return
  import jax
  if jax.device_count() == num_devices and jax.devices()[0].platform == "cpu":
    return
  # JAX already started with other devices (its device count is fixed at start-up).
  os.execve(sys.executable, [sys.executable, "-m", "mixer_jax.tools.memory"] + list(argv[1:]),
            simulation_env(num_devices))


# ------------------------------------------------------------------- the model
def build(config, num_classes: int, strategy: str, mesh, remat_policy=None):
  """The run's state.Setup under `strategy` (and `remat_policy`, if given; the
  schedule's length only changes constants inside the step, not its memory)."""
  from mixer_jax import state
  config = config.copy_and_resolve_references()
  config.sharding = strategy
  if remat_policy is not None:
    config.model.remat_policy = remat_policy
  total_steps = max(int(config.num_train_steps), int(config.warmup_steps) + 1)
  return state.Setup(config, num_classes, total_steps, mesh=mesh)


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of every ShapeDtypeStruct leaf (with sharding)."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def measure(config, num_classes: int, strategy: str, mesh, remat_policy=None) -> dict:
  """Compiles the train step for `mesh` under `strategy` (and `remat_policy`, if
  given); per-device bytes."""
  import jax
  from mixer_jax import device_memory, sharding

  sharding.check_batch_size(config.batch_size, config.grad_accum_steps, mesh)
  setup = build(config, num_classes, strategy, mesh, remat_policy)
  state, state_sharding = setup.abstract_state, setup.state_sharding
  batch = setup.abstract_batch(config.batch_size)
  step = setup.train_step()
  stats = step.lower(state, batch).compile().memory_analysis()

  computed = {"params": _bytes_per_device(state["params"]),
              "opt_state": _bytes_per_device(state["opt_state"]),
              "step": _bytes_per_device(state["step"]),
              "batch": _bytes_per_device(batch)}
  arguments = int(stats.argument_size_in_bytes)
  temporaries = int(stats.temp_size_in_bytes)
  sharded = sum(1 for s in jax.tree_util.tree_leaves(state_sharding)
                if any(axis is not None for axis in s.spec))
  return {
      "strategy": strategy,
      "remat_policy": setup.config.model.remat_policy,
      "params": computed["params"],
      "opt_state": computed["opt_state"],
      "params_plus_opt": computed["params"] + computed["opt_state"],
      "batch": computed["batch"],
      "arguments": arguments,
      "arguments_computed": sum(computed.values()),
      "temporaries": temporaries,
      "peak": device_memory.peak_bytes(stats),
      "sharded_arrays": sharded,
      "arrays": len(jax.tree_util.tree_leaves(state_sharding)),
  }


# --------------------------------------------------------------------- report
def human(num_bytes: float) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{int(num_bytes)} B"


def report(header: dict, rows) -> str:
  lines = [f"Mixer-{header['variant']} ({header['num_params']:,} params), "
           f"{header['image_size']} px, {header['num_classes']} classes, batch "
           f"{header['batch_size']} ({header['per_device_batch']} per device), "
           f"{header['num_devices']} simulated devices (mesh data={header['mesh_data']} x "
           f"model={header['mesh_model']}), compute {header['dtype']}, "
           f"{'scanned' if header['scan'] else 'unrolled'} blocks. Bytes per device:"]
  columns = ("params", "opt_state", "params_plus_opt", "batch", "temporaries", "peak")
  lines.append(f"{'strategy':<10}{'remat':<34}" + "".join(f"{c:>17}" for c in columns))
  for row in rows:
    lines.append(f"{row['strategy']:<10}{row['remat_policy']:<34}"
                 + "".join(f"{human(row[c]):>17}" for c in columns))
  return "\n".join(lines)


def run(config, num_devices: int, num_classes: int, strategies, remat_policies=()) -> dict:
  """Rows for every strategy x remat policy (none given: the config's policy)."""
  import jax
  from mixer_jax import models, sharding, state
  state.validate_config(config)  # The one config check; the library trusts its inputs.
  if jax.device_count() != num_devices:
    raise errors.ConfigError(f"JAX has {jax.device_count()} devices, not --num_devices="
                       f"{num_devices}; run `python -m mixer_jax.tools.memory` (it sets them up).")
  for strategy in strategies:
    if strategy not in sharding.STRATEGIES:
      raise errors.ConfigError(f"Unknown strategy {strategy!r} in --strategies; use "
                         f"{', '.join(sharding.STRATEGIES)}.")
  for policy in remat_policies:
    if policy not in models.REMAT_POLICIES:
      raise errors.ConfigError(f"Unknown remat policy {policy!r} in --remat_policies; use "
                                   f"{', '.join(models.REMAT_POLICIES)}.")
  mesh = sharding.make_mesh(config.mesh_model)
  state.resolve_model(config)
  num_params = build(config, num_classes, strategies[0], mesh).num_params
  header = {"variant": config.model.name, "num_params": num_params,
            "image_size": config.image_size, "num_classes": num_classes,
            "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps,
            "per_device_batch": config.batch_size // mesh.shape[sharding.DATA],
            "num_devices": num_devices, "mesh_data": mesh.shape[sharding.DATA],
            "mesh_model": mesh.shape[sharding.MODEL], "dtype": config.dtype,
            "fsdp_min_size": config.fsdp_min_size, "scan": bool(config.model.scan)}
  rows = [measure(config, num_classes, s, mesh, p)
          for s in strategies for p in (list(remat_policies) or [None])]
  return {"header": header, "rows": rows}


def main(argv):
  if len(argv) > 1:
    raise errors.usage(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None or not FLAGS.num_devices or FLAGS.num_devices < 1:
    raise errors.usage("Pass --config=CONFIG_FILE[:ARG] and --num_devices=N (N >= 1).")
  ensure_devices(FLAGS.num_devices, sys.argv)
  config = FLAGS.config
  num_classes = FLAGS.num_classes or config.num_classes or 1000
  strategies = [s.strip() for s in FLAGS.strategies.split(",") if s.strip()]
  policies = [p.strip() for p in FLAGS.remat_policies.split(",") if p.strip()]
  try:
    result = run(config, FLAGS.num_devices, num_classes, strategies, policies)
  except ValueError as e:
    print(f"Error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(errors.USER_ERROR)
  print(report(result["header"], result["rows"]))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
