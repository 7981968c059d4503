"""The model registry: a variant name -> a Flax module of one family.

  model = create_model("B/16", num_classes=1000)        # MLP-Mixer (mixer.py)
  model = create_model("resmlp_12", num_classes=1000)   # ResMLP (resmlp.py)
  model = create_model("gmlp_s16", num_classes=1000)    # gMLP (gmlp.py)
  params = init_params(model, 224)
  logits = model.apply({"params": params}, images, train=False)   # NHWC in [-1, 1]

A family registers a pattern for its variant names, the size fields that a matching
name stands for, and its module class (one file per family, e.g. `mixer.py`). Adding
a family is one import and one `register(...)` line at the bottom of this file. The
Mixer takes the paper's names ("B/16", any "<S|B|L|H>/<patch>"); ResMLP and gMLP take
timm's (resmlp_12, resmlp_24, resmlp_36, resmlp_big_24, gmlp_ti16, gmlp_s16, gmlp_b16;
timm's "_224" suffix left out: the resolution is the input's). `family(variant)` gives
a variant's Family: its name, its size fields, its block name, and the parameters
whose shapes give its sizes (`shape_keys`, read by weights.describe).

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
any tree holding them (Adam's moments, a whole train state), of any registered family
(the blocks' name, e.g. `ResMlpBlock`, is found in the tree).
"""

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from mixer_jax import kernels as kernel_sets
from mixer_jax.models import blocks, gmlp, mixer, resmlp
from mixer_jax.models.blocks import LAYOUTS, REMAT_POLICIES, SCANNED, UNROLLED, model_layout

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
  sizes: Callable[[str], dict]  # Variant name -> the module's size fields (integers).
  module: Any  # A flax module class taking num_classes, the size fields and options.
  name: str = ""  # "mixer", "resmlp", "gmlp".
  block: str = ""  # The blocks' name: `{block}_{i}` unrolled, `{block}` scanned.
  # Size field (and "num_tokens") -> (flat parameter key, axis) whose size it is; the
  # keys of block 0 are written with `{block}_0`.
  shape_keys: Mapping[str, Tuple[str, int]] = dataclasses.field(default_factory=dict)
  options: Callable[[str], dict] = lambda name: {}  # Variant name -> other field values.
  names: Tuple[str, ...] = ()  # The named variants, for messages and `variant_for`.


_FAMILIES = []
# Module fields a user may not set: they are chosen by `kernels`.
_OPS = ("dot_general", "conv_general_dilated", "activation", "layer_norm", "mlp_block",
        "constrain")


def register(family: Family):
  _FAMILIES.append(family)


def family(variant: str) -> Family:
  """The family whose pattern `variant` matches; ValueError naming the accepted names."""
  name = str(variant).strip()
  found = next((f for f in _FAMILIES if re.fullmatch(f.pattern, name)), None)
  if found is None:
    others = [n for f in _FAMILIES if f.name != "mixer" for n in f.names]
    raise ValueError(
        f"Unknown Mixer variant {variant!r}; use '<S|B|L|H>/<patch>' such as "
        f"{', '.join(PAPER_VARIANTS)} or 'B/8'"
        + (f", or a ResMLP or gMLP: {', '.join(others)}." if others else "."))
  return found


def family_named(name: str) -> Family:
  """The registered family called `name` ("mixer", "resmlp", "gmlp")."""
  found = next((f for f in _FAMILIES if f.name == name), None)
  if found is None:
    raise ValueError(f"Unknown model family {name!r}; use one of "
                     f"{', '.join(f.name for f in _FAMILIES if f.name)}.")
  return found


def families():
  return [f for f in _FAMILIES if f.name]


def variant_sizes(variant: str) -> dict:
  """The size fields that a variant name stands for, e.g. resmlp_12 -> patch_size 16,
  num_blocks 12, hidden_dim 384, channels_mlp_dim 1536."""
  return family(variant).sizes(str(variant).strip())


def variant_for(family_name: str, fields: Mapping[str, int]) -> str:
  """A variant name of the family for models of these size fields: the named variant
  with exactly these sizes, else the family's first (every size is then given as an
  override, so the name only chooses the family and its options)."""
  fam = family_named(family_name)
  for name in fam.names:
    if fam.sizes(name) == {k: int(v) for k, v in fields.items()}:
      return name
  if fam.name == "mixer":
    return f"S/{int(fields['patch_size'])}"
  return fam.names[0]


def create_model(variant: str, num_classes: Optional[int], **overrides):
  """Builds a model from a variant name plus optional field overrides.

  Args:
    variant: a Mixer "S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14" or any
      "<S|B|L|H>/<patch>"; a ResMLP resmlp_12, resmlp_24, resmlp_36, resmlp_big_24;
      a gMLP gmlp_ti16, gmlp_s16, gmlp_b16.
    num_classes: head width; 0 or None gives pooled pre-logit features.
    **overrides: any of the family's size fields (Mixer: patch_size, num_blocks,
      hidden_dim, tokens_mlp_dim, channels_mlp_dim; ResMLP and gMLP: patch_size,
      num_blocks, hidden_dim, channels_mlp_dim), its options (ResMLP:
      layerscale_init; ResMLP and gMLP: approximate_gelu), stoch_depth, dropout,
      dtype ("float32", "bfloat16" or a jnp dtype), head_bias_init, remat_policy
      (one of REMAT_POLICIES: "none", "full", "dots_saveable",
      "dots_with_no_batch_dims_saveable"), scan (bool: blocks under nn.scan, stacked
      parameters), and kernels ("auto", "xla", "cpu" or "pallas", see the module
      docstring).
  """
  name = str(variant).strip()
  fam = family(name)
  sizes = fam.sizes(name)
  module_fields = [f.name for f in dataclasses.fields(fam.module)]
  fields = [n for n in module_fields if n not in ("parent", "name", "num_classes") + _OPS]
  allowed = fields + ["kernels"]
  unknown = set(overrides) - set(allowed)
  if unknown:
    raise ValueError(f"Unknown model field(s) {sorted(unknown)}; allowed: {', '.join(allowed)}.")
  kernels = overrides.pop("kernels", "auto")
  values = {**fam.options(name), **sizes, **overrides}
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
  return fam.module(num_classes=num_classes, **values, **ops)


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


# --------------------------------------------------- block layouts, any family
def _prefix(tree) -> str:
  """The block name of the family whose blocks `tree` holds (the Mixer's if none)."""
  return blocks.find_prefix(tree, [f.block for f in _FAMILIES if f.block]) or blocks.BLOCK


# `prefix` None below: the blocks of whichever registered family `tree` holds.
def layout(tree, prefix: Optional[str] = None) -> str:
  """"unrolled" or "scanned" (blocks.layout)."""
  return blocks.layout(tree, prefix or _prefix(tree))


def to_unrolled(tree, prefix: Optional[str] = None):
  """`tree` with every scanned stack of blocks split per block (blocks.to_unrolled)."""
  return blocks.to_unrolled(tree, prefix or _prefix(tree))


def to_scanned(tree, prefix: Optional[str] = None):
  """`tree` with every unrolled stack of blocks stacked (blocks.to_scanned)."""
  return blocks.to_scanned(tree, prefix or _prefix(tree))


def to_layout(tree, target: str, prefix: Optional[str] = None):
  """`tree` in the `target` layout, converted if need be (blocks.to_layout)."""
  return blocks.to_layout(tree, target, prefix or _prefix(tree))


def is_stacked(path: str, prefix: Optional[str] = None) -> bool:
  """Whether the array at a '/'-joined `path` lies in a scanned stack of blocks (of
  `prefix`, or of any registered family), i.e. its axis 0 is the block axis."""
  parts = str(path).split("/")
  names = [prefix] if prefix else [f.block for f in _FAMILIES if f.block] or [blocks.BLOCK]
  return any(n in parts for n in names)


# ------------------------------------------------------------------ the families
_MIXER_BLOCK0 = "MixerBlock_0"
register(Family(
    r"[SBLH]/\d+", lambda name: dataclasses.asdict(parse_variant(name)), mixer.MlpMixer,
    name="mixer", block="MixerBlock", names=PAPER_VARIANTS,
    shape_keys={"patch_size": ("stem/kernel", 0), "hidden_dim": ("stem/kernel", 3),
                "num_tokens": (f"{_MIXER_BLOCK0}/token_mixing/Dense_0/kernel", 0),
                "tokens_mlp_dim": (f"{_MIXER_BLOCK0}/token_mixing/Dense_0/kernel", 1),
                "channels_mlp_dim": (f"{_MIXER_BLOCK0}/channel_mixing/Dense_0/kernel", 1)}))

# timm 1.0.31 `resmlp_*_224` (mlp_ratio 4) and `gmlp_*_224` (mlp_ratio 6).
RESMLP_VARIANTS = {  # name: (patch, blocks, width, LayerScale init)
    "resmlp_12": (16, 12, 384, 1e-4), "resmlp_24": (16, 24, 384, 1e-5),
    "resmlp_36": (16, 36, 384, 1e-6), "resmlp_big_24": (8, 24, 768, 1e-6)}
GMLP_VARIANTS = {  # name: (patch, blocks, width); gMLP paper Table 1.
    "gmlp_ti16": (16, 30, 128), "gmlp_s16": (16, 30, 256), "gmlp_b16": (16, 30, 512)}


def _sizes(patch, num_blocks, width, ratio):
  return dict(patch_size=patch, num_blocks=num_blocks, hidden_dim=width,
              channels_mlp_dim=ratio * width)


register(Family(
    "|".join(RESMLP_VARIANTS), lambda name: _sizes(*RESMLP_VARIANTS[name][:3], 4),
    resmlp.ResMLP, name="resmlp", block="ResMlpBlock", names=tuple(RESMLP_VARIANTS),
    options=lambda name: {"layerscale_init": RESMLP_VARIANTS[name][3]},
    shape_keys={"patch_size": ("stem/kernel", 0), "hidden_dim": ("stem/kernel", 3),
                "num_tokens": ("ResMlpBlock_0/token_mixing/kernel", 0),
                "channels_mlp_dim": ("ResMlpBlock_0/channel_mixing/Dense_0/kernel", 1)}))
register(Family(
    "|".join(GMLP_VARIANTS), lambda name: _sizes(*GMLP_VARIANTS[name], 6), gmlp.GMLP,
    name="gmlp", block="GMlpBlock", names=tuple(GMLP_VARIANTS),
    shape_keys={"patch_size": ("stem/kernel", 0), "hidden_dim": ("stem/kernel", 3),
                "num_tokens": ("GMlpBlock_0/spatial_gating/spatial_proj/kernel", 0),
                "channels_mlp_dim": ("GMlpBlock_0/channel_proj_in/kernel", 1)}))
