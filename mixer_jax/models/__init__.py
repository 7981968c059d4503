"""The model registry: a family's module, its presets, and the run's name.

  model = create_model("mixer", num_classes=1000, patch_size=16, num_blocks=12,
                       hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072)
  model = from_preset("B/16", num_classes=1000)   # the same
  params = init_params(model, 224)
  logits = model.apply({"params": params}, images, train=False)   # NHWC in [-1, 1]

A model is its fields: `create_model(family, num_classes, **fields)` is
`Family.module(num_classes=..., **fields)`, nothing in between. A preset name
("B/16", any "<S|B|L|H>/<patch>"; timm's resmlp_12, resmlp_24, resmlp_36,
resmlp_big_24, gmlp_ti16, gmlp_s16, gmlp_b16, their "_224" left out) only fills
fields (`preset`), and `model_name` names a model from its fields ("B/16", or
"Mixer custom (patch 4, 8 x 128)" where no preset has them). Adding a family is one
`register(...)` line at the bottom of this file; checking the values is
state.resolve_model's, once (the modules trust their inputs).

The modules are the papers' plain flax code. Faster equal forms of their layers
(mixer_jax/kernels/) enter at apply time through flax's method interceptors, chosen
by the trainer (state.py), never through a module field.

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

from mixer_jax.models import blocks, features, gmlp, layers, mixer, resmlp
from mixer_jax.models.blocks import LAYOUTS, REMAT_POLICIES, SCANNED, UNROLLED, model_layout

# Paper Table 1: hidden size C, blocks, token-MLP width D_S, channel-MLP width D_C.
SIZES = {
    "S": dict(hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B": dict(hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H": dict(hidden_dim=1280, num_blocks=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}
SIZE_FIELDS = ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim")
PAPER_VARIANTS = ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")


def parse_variant(variant: str) -> dict:
  """'B/16' -> the Mixer's size fields. Any '<S|B|L|H>/<patch>' is accepted."""
  m = re.fullmatch(r"([SBLH])/(\d+)", str(variant).strip())
  if not m or int(m.group(2)) <= 0:
    raise ValueError(
        f"Unknown Mixer variant {variant!r}; use '<S|B|L|H>/<patch>' such as "
        f"{', '.join(PAPER_VARIANTS)} or 'B/8'.")
  return dict(patch_size=int(m.group(2)), **SIZES[m.group(1)])


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # "mixer", "resmlp", "gmlp".
  module: Any  # The flax model class: num_classes plus the fields.
  block: Any  # The block class: its name is `{block}_{i}` unrolled, `{block}` scanned.
  title: str  # "Mixer", "ResMLP", "gMLP": for names and messages.
  presets: Callable[[str], Optional[dict]]  # Preset name -> its fields, None if not one.
  names: Tuple[str, ...] = ()  # The named presets, for messages and `model_name`.
  # Size field (and "num_tokens") -> (flat parameter key, axis) whose size it is; the
  # keys of block 0 are written with `{block}_0`.
  shape_keys: Mapping[str, Tuple[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def block_name(self) -> str:
    return self.block.__name__

  @property
  def fields(self) -> Tuple[str, ...]:
    """The model's fields that config.model may set (num_classes is the run's)."""
    return tuple(f.name for f in dataclasses.fields(self.module)
                 if f.name not in ("parent", "name", "num_classes"))


_FAMILIES = []


def register(family: Family):
  _FAMILIES.append(family)


def family_of_model(model) -> Family:
  """The registered family of a model instance (kernels' wrapper seen through)."""
  module = type(getattr(model, "model", model))
  found = next((f for f in _FAMILIES if issubclass(module, f.module)), None)
  if found is None:
    raise ValueError(f"{module.__name__} is not a registered family's model.")
  return found


def capture(model, params, images, *, mixing: bool = False, **apply_kwargs):
  """Each block's output (and with `mixing` its token- and channel-mixing outputs),
  stacked on the block axis, beside the model's output: features.capture."""
  return features.capture(model, params, images, mixing=mixing,
                          block=family_of_model(model).block_name, **apply_kwargs)


def block_features(model, layer: int):
  """`model` as a features model of block `layer` (tokens averaged): few-shot probes."""
  return features.BlockFeatures(model, layer, family_of_model(model).block_name)


def families():
  return list(_FAMILIES)


def family_named(name: str) -> Family:
  """The registered family called `name` ("mixer", "resmlp", "gmlp")."""
  found = next((f for f in _FAMILIES if f.name == name), None)
  if found is None:
    raise ValueError(f"Unknown model family {name!r}; use one of "
                     f"{', '.join(f.name for f in _FAMILIES)}.")
  return found


def preset(variant: str) -> Tuple[Family, dict]:
  """A preset name's family and the fields it fills; ValueError naming the accepted names."""
  name = str(variant).strip()
  for fam in _FAMILIES:
    fields = fam.presets(name)
    if fields is not None:
      return fam, fields
  others = [n for f in _FAMILIES if f.name != "mixer" for n in f.names]
  raise ValueError(
      f"Unknown Mixer variant {variant!r}; use '<S|B|L|H>/<patch>' such as "
      f"{', '.join(PAPER_VARIANTS)} or 'B/8'"
      + (f", or a ResMLP or gMLP: {', '.join(others)}." if others else "."))


def model_name(family_name: str, fields: Mapping[str, Any]) -> str:
  """The name of the model with these fields: the preset whose size fields (and
  options, e.g. ResMLP's LayerScale init) are these ("B/16", "B/8", "resmlp_24"),
  else a description such as "Mixer custom (patch 4, 8 x 128)" (blocks x width)."""
  fam = family_named(family_name)
  same = lambda preset_fields: all(fields.get(k) == v for k, v in preset_fields.items()
                                  if k in SIZE_FIELDS)
  if fam.name == "mixer":
    for letter, sizes in SIZES.items():
      if "patch_size" in fields and same(sizes):
        return f"{letter}/{int(fields['patch_size'])}"
  for name in fam.names:
    if same(fam.presets(name)):
      return name
  return (f"{fam.title} custom (patch {int(fields['patch_size'])}, "
          f"{int(fields['num_blocks'])} x {int(fields['hidden_dim'])})")


def from_preset(variant: str, num_classes: Optional[int], **fields):
  """`create_model` of a preset's family and fields, `fields` given replacing the
  preset's: `from_preset("B/16", 1000)`, `from_preset("S/4", 10, num_blocks=2)`."""
  family, filled = preset(variant)
  return create_model(family.name, num_classes, **{**filled, **fields})


def create_model(family_name: str, num_classes: Optional[int], **fields):
  """`Family.module(num_classes=num_classes, **fields)`: the family's plain model.

  Args:
    family_name: "mixer", "resmlp" or "gmlp".
    num_classes: head width; 0 or None gives pooled pre-logit features.
    **fields: the module's fields (Mixer: patch_size, num_blocks, hidden_dim,
      tokens_mlp_dim, channels_mlp_dim; ResMLP and gMLP: all but tokens_mlp_dim, plus
      ResMLP's layerscale_init and both's approximate_gelu), stoch_depth, dropout,
      dtype (a jnp dtype or its name), head_bias_init, remat_policy (one of
      REMAT_POLICIES) and scan. Checked by state.resolve_model, not here.
  """
  if isinstance(fields.get("dtype"), str):
    fields["dtype"] = compute_dtype(fields["dtype"])
  return family_named(family_name).module(num_classes=num_classes, **fields)


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
  return blocks.find_prefix(tree, [f.block_name for f in _FAMILIES]) or blocks.BLOCK


# `prefix` None below: the blocks of whichever registered family `tree` holds.
def layout(tree, prefix: Optional[str] = None) -> str:
  """"unrolled" or "scanned" (blocks.layout)."""
  return blocks.layout(tree, prefix or _prefix(tree))



def layout_or_none(tree) -> Optional[str]:
  """`layout(tree)`, or None for a tree without blocks (or mixing both layouts: the
  key-by-key checks of weights.py then name the problem)."""
  try:
    return layout(tree)
  except ValueError:
    return None

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
  names = [prefix] if prefix else [f.block_name for f in _FAMILIES] or [blocks.BLOCK]
  return any(n in parts for n in names)


# ------------------------------------------------------------------ the families
_MIXER_BLOCK0 = "MixerBlock_0"
register(Family(
    "mixer", mixer.MlpMixer, mixer.MixerBlock, "Mixer",
    lambda name: parse_variant(name) if re.fullmatch(r"[SBLH]/\d+", name) else None,
    names=PAPER_VARIANTS,
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


def _resmlp(name):
  if name not in RESMLP_VARIANTS:
    return None
  patch, num_blocks, width, layerscale = RESMLP_VARIANTS[name]
  return dict(_sizes(patch, num_blocks, width, 4), layerscale_init=layerscale)


register(Family(
    "resmlp", resmlp.ResMLP, resmlp.ResMlpBlock, "ResMLP", _resmlp,
    names=tuple(RESMLP_VARIANTS),
    shape_keys={"patch_size": ("stem/kernel", 0), "hidden_dim": ("stem/kernel", 3),
                "num_tokens": ("ResMlpBlock_0/token_mixing/kernel", 0),
                "channels_mlp_dim": ("ResMlpBlock_0/channel_mixing/Dense_0/kernel", 1)}))
register(Family(
    "gmlp", gmlp.GMLP, gmlp.GMlpBlock, "gMLP",
    lambda name: _sizes(*GMLP_VARIANTS[name], 6) if name in GMLP_VARIANTS else None,
    names=tuple(GMLP_VARIANTS),
    shape_keys={"patch_size": ("stem/kernel", 0), "hidden_dim": ("stem/kernel", 3),
                "num_tokens": ("GMlpBlock_0/spatial_gating/spatial_proj/kernel", 0),
                "channels_mlp_dim": ("GMlpBlock_0/channel_proj_in/kernel", 1)}))
