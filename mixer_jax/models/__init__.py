"""The model registry: a variant name -> a Flax module of one family.

  model = create_model("B/16", num_classes=1000)
  params = init_params(model, 224)
  logits = model.apply({"params": params}, images, train=False)   # NHWC in [-1, 1]

A family registers a pattern for its variant names, the size fields that a matching
name stands for, and its module class (one file per family, e.g. `mixer.py`). Adding
a family is one import and one `register(...)` line at the bottom of this file.

`kernels` picks the ops a module computes with: "xla" = the plain ops of the family
file, "cpu" = the faster equal forms of `mixer_jax/kernels/cpu.py` (through the
module's `dot_general` / `conv_general_dilated` / `activation` fields), "pallas" =
the GPU kernels of `mixer_jax/kernels/pallas.py` (through its `layer_norm` /
`mlp_block` module fields; the plain ops, logged once, where they cannot compile),
"auto" = "cpu" on the CPU backend and "xla" elsewhere. The plain ops support every JAX
transformation; the "cpu" matmul and the "pallas" kernels have custom VJPs, so
forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian) needs kernels="xla".

`scan=True` runs the blocks under `nn.scan`: the parameters of the N blocks are then
stacked on a leading axis (the "scanned" layout). The released `.npz` layout
("unrolled") stays the interchange format: `to_unrolled`, `to_scanned`, `to_layout`
and `layout` (from `blocks.py`) convert and detect either, for parameters and for
any tree holding them (Adam's moments, a whole train state).
"""

import dataclasses
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mixer_jax import kernels as kernel_sets
from mixer_jax.models import mixer
from mixer_jax.models.blocks import (LAYOUTS, REMAT_POLICIES, SCANNED, UNROLLED, is_stacked,
                                     layout, model_layout, to_layout, to_scanned,
                                     to_unrolled)

# Paper Table 1: hidden size C, blocks, token-MLP width D_S, channel-MLP width D_C.
SIZES = {
    "S": dict(hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B": dict(hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H": dict(hidden_dim=1280, num_blocks=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}
PAPER_VARIANTS = ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")
KERNELS = ("auto", "xla", "cpu", "pallas")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int


def parse_variant(variant: str) -> MixerSpec:
  """'B/16' -> MixerSpec. Any '<S|B|L|H>/<patch>' is accepted."""
  m = re.fullmatch(r"([SBLH])/(\d+)", str(variant).strip())
  if not m or int(m.group(2)) <= 0:
    raise ValueError(
        f"Unknown Mixer variant {variant!r}; use '<S|B|L|H>/<patch>' such as "
        f"{', '.join(PAPER_VARIANTS)} or 'B/8'.")
  return MixerSpec(patch_size=int(m.group(2)), **SIZES[m.group(1)])


@dataclasses.dataclass(frozen=True)
class Family:
  pattern: str  # Matched against the whole variant name.
  sizes: Callable[[str], dict]  # Variant name -> the module's size fields.
  module: Any  # A flax module class taking num_classes, the size fields and options.


_FAMILIES = []
# Module fields a user may not set: they are chosen by `kernels`.
_OPS = ("dot_general", "conv_general_dilated", "activation", "layer_norm", "mlp_block")


def register(family: Family):
  _FAMILIES.append(family)


def create_model(variant: str, num_classes: Optional[int], **overrides):
  """Builds a model from a variant name plus optional field overrides.

  Args:
    variant: "S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14" or any
      "<S|B|L|H>/<patch>".
    num_classes: head width; 0 or None gives pooled pre-logit features.
    **overrides: any of the family's size fields (for the Mixer: patch_size,
      num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim), stoch_depth, dropout,
      dtype ("float32", "bfloat16" or a jnp dtype), head_bias_init, remat_policy
      (one of REMAT_POLICIES: "none", "full", "dots_saveable",
      "dots_with_no_batch_dims_saveable"), scan (bool: blocks under nn.scan, stacked
      parameters), and kernels ("auto", "xla", "cpu" or "pallas", see the module
      docstring).
  """
  name = str(variant).strip()
  family = next((f for f in _FAMILIES if re.fullmatch(f.pattern, name)), None)
  if family is None:
    parse_variant(variant)  # Raises the error that names the accepted forms.
  sizes = family.sizes(name)
  module_fields = [f.name for f in dataclasses.fields(family.module)]
  fields = [n for n in module_fields if n not in ("parent", "name", "num_classes") + _OPS]
  allowed = fields + ["kernels"]
  unknown = set(overrides) - set(allowed)
  if unknown:
    raise ValueError(f"Unknown model field(s) {sorted(unknown)}; allowed: {', '.join(allowed)}.")
  kernels = overrides.pop("kernels", "auto")
  values = {**sizes, **overrides}
  for key in sizes:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"Model field {key}={value!r} must be a positive integer.")
  if num_classes is not None and (isinstance(num_classes, bool) or
                                  not isinstance(num_classes, int) or num_classes < 0):
    raise ValueError(f"num_classes={num_classes!r} must be a non-negative integer "
                     "(0 or None for pre-logit features).")
  for key in ("stoch_depth", "dropout"):
    value = values.get(key, 0.0)
    if not 0.0 <= float(value) < 1.0:
      raise ValueError(f"Model field {key}={value!r} must be in [0, 1).")
  if "dtype" in values:
    values["dtype"] = compute_dtype(values["dtype"])
  if values.get("remat_policy", "none") not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {values['remat_policy']!r}; use one of "
                     f"{', '.join(REMAT_POLICIES)}.")
  if not isinstance(values.get("scan", False), bool):
    raise ValueError(f"Model field scan={values['scan']!r} must be True or False.")
  ops = {k: v for k, v in kernel_ops(kernels).items() if k in module_fields}
  return family.module(num_classes=num_classes, **values, **ops)


def kernel_ops(kernels: str = "auto") -> dict:
  """The op overrides that `kernels` stands for ({} = the family file's plain ops)."""
  if kernels not in KERNELS:
    raise ValueError(f"Unknown kernels {kernels!r}; use one of {', '.join(KERNELS)}.")
  if kernels == "auto":
    kernels = "cpu" if jax.default_backend() == "cpu" else "xla"
  return kernel_sets.SETS[kernels]


def compute_dtype(name):
  """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
  allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if isinstance(name, str):
    if name not in allowed:
      raise ValueError(f"Unknown compute dtype {name!r}; use one of {', '.join(allowed)}.")
    return allowed[name]
  return name


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def init_params(model, image_size: int, rng=None):
  """Parameters of `model` for square images of side `image_size`."""
  rng = jax.random.key(0) if rng is None else rng
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda r: model.init(r, dummy, train=False))(rng)["params"]


def param_shapes(model, image_size: int):
  """Parameter ShapeDtypeStructs, computed without allocating or running anything."""
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)["params"]


register(Family(r"[SBLH]/\d+", lambda name: dataclasses.asdict(parse_variant(name)),
                mixer.MlpMixer))
