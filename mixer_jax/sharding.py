"""The device mesh, sharding rules (replicate, fsdp) and host-local -> global arrays.

The only module that talks to `jax.sharding`. One code path for 1 device, N devices
and N hosts: the mesh decides.

Mesh axes: `data` (batch, and parameters under fsdp) x `model` (the MLP hidden
dimension, when `mesh_model` > 1).
"""

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
STRATEGIES = ("replicate", "fsdp")


def make_mesh(mesh_model: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if mesh_model < 1 or n % mesh_model:
    raise ValueError(f"mesh_model={mesh_model} must be a positive divisor of the "
                     f"device count {n}.")
  # Auto axes: XLA propagates shardings from the inputs through the train step.
  return jax.make_mesh((n // mesh_model, mesh_model), (DATA, MODEL), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_constraint(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
  """Pins an activation's batch (leading) axis to the data axis.

  Inside a scanned model's loop XLA's sharding propagation sees one block, with fsdp
  its weights sharded over `data`, and may keep them sharded while gathering the batch
  instead: every device then holds the whole global batch's activations (H/14 on 256
  devices: 65.6 GiB of temporaries instead of 3.4). Pinning the tokens entering each
  block keeps the step data-parallel, gathering the weights as unrolled fsdp does.
  """
  return functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sharding(mesh))


def batch_interceptor(mesh: Mesh, block_classes: Tuple[type, ...]):
  """A flax method interceptor applying `batch_constraint` to the tokens entering each
  block (a call of one of `block_classes`): the trainer's rule, installed around
  `apply` by state.py, so the models carry nothing for it."""
  constrain = batch_constraint(mesh)

  def intercept(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and args
        and isinstance(context.module, block_classes)):
      args = (constrain(args[0]),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  return intercept


def _model_axis(path: str, shape) -> Optional[int]:
  """The MLP hidden dimension of a Dense kernel/bias (tensor parallelism)."""
  if "/Dense_0/kernel" in path:
    return len(shape) - 1   # (in, hidden): shard hidden.
  if "/Dense_0/bias" in path:
    return 0
  if "/Dense_1/kernel" in path:
    return 0               # (hidden, out): shard hidden.
  return None


def param_spec(path: str, shape, mesh: Mesh, strategy: str, fsdp_min_size: int,
               stacked: bool = False) -> P:
  """PartitionSpec of one parameter (or optimiser-state array shaped like one).

  `stacked`: axis 0 stacks the blocks of a scanned model. It stays whole (each scan
  step slices it) and the rules apply to one block's array, so every block's slice
  is laid out as the unrolled model's block is.
  """
  if stacked and len(shape):
    return P(None, *param_spec(path, shape[1:], mesh, strategy, fsdp_min_size))
  spec = [None] * len(shape)
  model_size = mesh.shape[MODEL]
  if model_size > 1:
    axis = _model_axis(path, shape)
    if axis is not None and shape[axis] % model_size == 0:
      spec[axis] = MODEL
  data_size = mesh.shape[DATA]
  if strategy == "fsdp" and data_size > 1 and int(np.prod(shape)) >= fsdp_min_size:
    # The largest dimension that divides evenly and is not already model-sharded.
    candidates = [(shape[i], -i) for i in range(len(shape))
                  if spec[i] is None and shape[i] % data_size == 0]
    if candidates:
      spec[-max(candidates)[1]] = DATA
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, strategy: str = "replicate",
                    fsdp_min_size: int = 2 ** 18,
                    stacked: Callable[[str], bool] = lambda path: False) -> Any:
  """NamedShardings for every leaf of a (shape-only) train state pytree.

  `stacked(path)`: whether the leaf at a '/'-joined path has a leading block axis
  (a scanned model's blocks; models.is_stacked). `strategy` is one of STRATEGIES
  (state.validate_config checks config.sharding).
  """

  def leaf_sharding(path, leaf):
    shape = getattr(leaf, "shape", ())
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return NamedSharding(mesh, param_spec(name, shape, mesh, strategy, fsdp_min_size,
                                          stacked(name)))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (this process's rows) -> one global jax.Array per leaf."""
  sharding = batch_sharding(mesh)
  n = jax.process_count()

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * n,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map(to_global, local_batch)


def any_process(flag: bool, mesh: Mesh) -> jax.Array:
  """True on every process if any process passed True: a one-element-per-device
  all-reduce, dispatched asynchronously like a train step (read it later)."""
  devices = NamedSharding(mesh, P((DATA, MODEL)))
  flags = jax.make_array_from_callback((mesh.devices.size,), devices,
                                       lambda index: np.full((1,), flag))
  return _reduce_any(flags, replicated(mesh))


@functools.partial(jax.jit, static_argnums=1)
def _reduce_any(flags, out_sharding):
  return jax.lax.with_sharding_constraint(jnp.any(flags), out_sharding)


def check_batch_size(batch_size: int, grad_accum_steps: int, mesh: Mesh, name="batch_size"):
  """Every micro-batch must split evenly over the data axis and the processes."""
  data = mesh.shape[DATA]
  procs = jax.process_count()
  if batch_size <= 0:
    raise ValueError(f"config.{name}={batch_size} must be positive.")
  if grad_accum_steps <= 0 or batch_size % grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={grad_accum_steps} must be a positive divisor "
                     f"of config.{name}={batch_size}.")
  micro = batch_size // grad_accum_steps
  if micro % data or micro % procs:
    raise ValueError(
        f"config.{name}={batch_size} (micro-batch {micro} with grad_accum_steps="
        f"{grad_accum_steps}) must be divisible by the {data} data-parallel devices and "
        f"{procs} processes; use a multiple of {np.lcm(data, procs) * grad_accum_steps}.")
