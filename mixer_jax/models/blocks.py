"""A family's stack of N identical blocks: remat policies, the stochastic-depth
schedule, and the two parameter layouts with the conversions between them.

Unrolled (the released `.npz` layout and the interchange format): one subtree per
block, `MixerBlock_0`, ..., `MixerBlock_{N-1}`, each with the block's own shapes.
Scanned (`create_model(..., scan=True)`: the blocks run under `nn.scan`): one subtree
`MixerBlock` whose every array has a leading block axis of length N, i.e.
`scanned["MixerBlock"][...][k] == unrolled[f"MixerBlock_{k}"][...]` (big_vision's
naming for its scanned ViT encoder blocks).

`to_unrolled`, `to_scanned` and `to_layout` convert every parameter-shaped mapping
anywhere in a pytree, so a whole train state converts at once (the parameters and
Adam's `mu` and `nu`); leaves may be numpy arrays, jax Arrays or ShapeDtypeStructs
(whose shardings are dropped: lay out the result anew). Every key and shape is
checked; a tree that is not a stack of identical blocks raises ValueError naming the
key.
"""

import functools
import re
from typing import Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax.models import layers

BLOCK = "MixerBlock"  # The Mixer's block name; other families pass their own `prefix`.
UNROLLED, SCANNED = "unrolled", "scanned"
LAYOUTS = (UNROLLED, SCANNED)

# jax.checkpoint policies by name: what each rematerialised block keeps from its
# forward pass for the backward one (everything else is recomputed). "none" runs the
# blocks without remat. "full" keeps only the block's input: jax's default, the same
# as its `nothing_saveable`. The Mixer's matmuls have no batch dimensions, so for it
# the last two keep the same (the matmul outputs, not LayerNorm, GELU, transposes).
_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = ("none",) + tuple(_POLICIES)


def stoch_depth_rates(stoch_depth: float, num_blocks: int) -> np.ndarray:
  """Per-block drop rates, rising linearly from 0 (first block) to `stoch_depth`
  (last), in float32: the same numbers whether the blocks are unrolled or scanned."""
  return np.asarray([stoch_depth * i / max(num_blocks - 1, 1) for i in range(num_blocks)],
                    np.float32)


def run_blocks(model, block_class, x, *, train: bool):
  """`x` through `model.num_blocks` blocks `block_class`, each called as
  `block(x, train, drop_rate)`, inside the model's compact method; the blocks take
  their fields from the model by name (layers.inherited).

  Unrolled, the blocks are `{Block}_0` ... `{Block}_{N-1}` (the class's name); with
  `model.scan` one block `{Block}` runs N times under nn.scan over its stacked
  parameters. In training, block i of N drops its residual branches at
  stoch_depth * i / (N - 1) (drop_rate None: no stochastic depth). A
  `model.remat_policy` other than "none" recomputes each block's activations in the
  backward pass. Every family's model runs its blocks through this loop.
  """
  prefix, n, scan = block_class.__name__, model.num_blocks, model.scan
  block = block_class
  if model.remat_policy != "none":  # Under scan the loop itself keeps XLA from CSE.
    block = nn.remat(block, policy=_POLICIES[model.remat_policy],
                     prevent_cse=not scan, static_argnums=(2,))
  block = functools.partial(block, **layers.inherited(model, block_class))
  rates = (stoch_depth_rates(model.stoch_depth, n)
           if train and model.stoch_depth > 0.0 else None)
  if scan:
    body = lambda block, x, rate: (block(x, train, rate), None)
    # Intermediates (features.capture) stack on the block axis like the parameters.
    x, _ = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True},
                   length=n)(block(name=prefix), x, rates)
    return x
  for i in range(n):
    x = block(name=f"{prefix}_{i}")(x, train, None if rates is None else rates[i])
  return x


# ------------------------------------------------------------------ the layouts
def _block_index(key: str, prefix: str) -> Optional[int]:
  m = re.fullmatch(rf"{re.escape(prefix)}_(\d+)", str(key))
  return int(m.group(1)) if m else None


def _is_params(x, prefix: str) -> bool:
  """A mapping that holds blocks of `prefix` in either layout."""
  return isinstance(x, Mapping) and any(
      k == prefix or _block_index(k, prefix) is not None for k in x)


def _layout_of(params: Mapping, prefix: str) -> str:
  scanned = prefix in params
  unrolled = [k for k in params if _block_index(k, prefix) is not None]
  if scanned and unrolled:
    raise ValueError(f"The tree holds both {prefix} (scanned) and {unrolled[0]} "
                     f"(unrolled) blocks; it mixes the two layouts.")
  return SCANNED if scanned else UNROLLED


def layout(tree, prefix: str = BLOCK) -> str:
  """"unrolled" or "scanned": the layout of the blocks in `tree` (parameters, an
  optimiser state or a whole train state). ValueError if it holds no blocks, or both
  layouts."""
  found = set()

  def visit(x):
    if _is_params(x, prefix):
      found.add(_layout_of(x, prefix))
    return x

  jax.tree_util.tree_map(visit, tree, is_leaf=lambda x: _is_params(x, prefix))
  if len(found) != 1:
    raise ValueError(f"The tree holds {'no' if not found else 'both kinds of'} {prefix} "
                     "blocks; expected the unrolled or the scanned layout.")
  return found.pop()


def _flatten(tree: Mapping, parent: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    path = f"{parent}/{key}" if parent else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _shape(x):
  return tuple(np.shape(x)) if not isinstance(x, jax.ShapeDtypeStruct) else x.shape


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _is_empty(x) -> bool:
  """A leaf-less node such as None or optax's MaskedNode: nothing to stack."""
  return not jax.tree_util.tree_leaves(x)


def _stack(values):
  first = values[0]
  if _is_empty(first):
    return first
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(values),) + first.shape, first.dtype)
  if any(isinstance(v, jax.Array) for v in values):
    return jnp.stack(values)
  return np.stack([np.asarray(v) for v in values])


def _unstack(value, n: int):
  if _is_empty(value):
    return [value] * n
  if isinstance(value, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(value.shape[1:], value.dtype)] * n
  return [value[i] for i in range(n)]


def _scan_params(params: Mapping, prefix: str) -> dict:
  if _layout_of(params, prefix) == SCANNED:
    return dict(params)
  indices = sorted(_block_index(k, prefix) for k in params
                   if _block_index(k, prefix) is not None)
  if indices != list(range(len(indices))):
    missing = sorted(set(range(max(indices) + 1)) - set(indices))
    raise ValueError(f"{prefix}_{missing[0]} is missing: the tree has blocks {indices}, "
                     f"not 0 to {max(indices)}.")
  blocks = [_flatten(params[f"{prefix}_{i}"]) for i in indices]
  first = blocks[0]
  for i, block in enumerate(blocks[1:], 1):
    for key in sorted(set(first) ^ set(block)):
      has, lacks = (i, 0) if key in block else (0, i)
      raise ValueError(f"{prefix}_{has}/{key} has no counterpart in {prefix}_{lacks}; "
                       "the blocks differ, so they cannot be stacked.")
    for key, value in first.items():
      other = block[key]
      if (_shape(other), _dtype(other)) != (_shape(value), _dtype(value)):
        raise ValueError(f"{prefix}_{i}/{key} has shape {_shape(other)} ({_dtype(other)}) "
                         f"but {prefix}_0/{key} has {_shape(value)} ({_dtype(value)}); the "
                         "blocks differ, so they cannot be stacked.")
  out = {k: v for k, v in params.items() if _block_index(k, prefix) is None}
  out[prefix] = _unflatten({key: _stack([b[key] for b in blocks]) for key in first})
  return out


def _unroll_params(params: Mapping, prefix: str) -> dict:
  if _layout_of(params, prefix) == UNROLLED:
    return dict(params)
  flat = _flatten(params[prefix]) if isinstance(params[prefix], Mapping) else {}
  sizes = {key: _shape(v)[0] for key, v in flat.items() if not _is_empty(v) and _shape(v)}
  scalars = [key for key, v in flat.items() if not _is_empty(v) and not _shape(v)]
  if scalars or not sizes:
    raise ValueError(f"{prefix}/{(scalars or [''])[0]} has no leading block axis; a scanned "
                     f"{prefix} holds arrays stacked over the blocks.")
  n = next(iter(sizes.values()))
  for key, size in sizes.items():
    if size != n:
      raise ValueError(f"{prefix}/{key} stacks {size} blocks but "
                       f"{prefix}/{next(iter(sizes))} stacks {n}; it is not one stack.")
  pieces = {key: _unstack(value, n) for key, value in flat.items()}
  out = {k: v for k, v in params.items() if k != prefix}
  for i in range(n):
    out[f"{prefix}_{i}"] = _unflatten({key: pieces[key][i] for key in flat})
  return out


def _convert(tree, convert_params, prefix: str):
  layout(tree, prefix)  # Raises on a tree without blocks or with both layouts.
  return jax.tree_util.tree_map(
      lambda x: convert_params(x, prefix) if _is_params(x, prefix) else x, tree,
      is_leaf=lambda x: _is_params(x, prefix))


def to_scanned(tree, prefix: str = BLOCK):
  """`tree` with every unrolled stack of blocks stacked (scanned layout kept as is)."""
  return _convert(tree, _scan_params, prefix)


def to_unrolled(tree, prefix: str = BLOCK):
  """`tree` with every scanned stack of blocks split per block (unrolled kept as is)."""
  return _convert(tree, _unroll_params, prefix)


def to_layout(tree, target: str, prefix: str = BLOCK):
  """`tree` in the `target` layout ("unrolled" or "scanned"), converted if need be."""
  if target not in LAYOUTS:
    raise ValueError(f"Unknown layout {target!r}; use one of {', '.join(LAYOUTS)}.")
  return (to_scanned if target == SCANNED else to_unrolled)(tree, prefix)


def find_prefix(tree, prefixes: Iterable[str]) -> Optional[str]:
  """The first of `prefixes` whose blocks (either layout) `tree` holds, else None."""
  prefixes = tuple(prefixes)
  found = []

  def visit(x):
    if isinstance(x, Mapping):
      found.extend(p for p in prefixes if _is_params(x, p))
    return x

  jax.tree_util.tree_map(visit, tree, is_leaf=lambda x: isinstance(x, Mapping) and any(
      _is_params(x, p) for p in prefixes))
  return next((p for p in prefixes if p in found), None)


def model_layout(model) -> str:
  """The layout of a model's parameters: "scanned" if it runs its blocks under scan."""
  return SCANNED if getattr(model, "scan", False) else UNROLLED


def is_stacked(path: str, prefix: str = BLOCK) -> bool:
  """Whether the array at a '/'-joined `path` (of parameters or an optimiser state)
  lies in a scanned stack, i.e. its axis 0 is the block axis."""
  return prefix in str(path).split("/")
