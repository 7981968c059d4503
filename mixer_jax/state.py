"""One setup path: model, optimiser, train state, shardings and jitted steps from a config.

Every entry point (train, evaluate, predict, memory, benchmark) builds what a step
needs here, so a new model family, optimiser or sharding rule is wired once. No
TensorFlow, tfds, ml_collections or clu import: the benchmark runs this on GPU images
that lack them, so `config` only needs attribute access (a ConfigDict from configs/
or any object with the same fields).

  state.resolve_model(config, weights_info)   # once, at the entry point
  state.resolve_randaugment_on(config)        # likewise (Setup does it too)
  setup = state.Setup(config, num_classes, total_steps)
  train_state = setup.init_state()
  train_step = setup.train_step()            # jitted, sharded, state donated
  sums = setup.eval_step()(params, batch)   # jitted, replicated sums
"""

import dataclasses
import re
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import errors
from mixer_jax import kernels
from mixer_jax import models
from mixer_jax import optim
from mixer_jax import sharding
from mixer_jax import steps

# config.model's size fields: the Mixer's five; ResMLP and gMLP have all but tokens_mlp_dim.
SIZE_FIELDS = models.SIZE_FIELDS
# config.model keys that are not model fields: the preset, the family, the run's name
# (derived) and the kernels (the trainer's choice).
_NOT_FIELDS = ("variant", "family", "name", "kernels")
# Fields a weight file fixes (with its family's options at their defaults).
_ARCHITECTURE = SIZE_FIELDS + ("family", "layerscale_init", "approximate_gelu")
LOSSES = ("softmax", "sigmoid")
NONFINITE = ("stop", "skip")
TRAIN_CROPS = ("inception", "resize", "pad", "none")
EVAL_PREPROCESSES = ("resize_crop", "resize")


# ------------------------------------------------------------------ the config
def _checks(config):
  """get(name) and check(name, ok, requirement) for the config's values."""
  def get(name):
    return (getattr(config, name) if "." not in name
            else getattr(config.model, name.split(".", 1)[1]))

  def check(name, ok, requirement):
    value = get(name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and ok(value)):
      raise errors.ConfigError(f"config.{name}={value!r} must be {requirement}.")
  return get, check


def validate_model(config) -> None:
  """The model's values (config.model, dtype), one clear sentence per bad value; the
  models trust them."""
  get, check = _checks(config)
  for name in SIZE_FIELDS:
    if getattr(config.model, name, None) is not None:
      check(f"model.{name}", lambda v: isinstance(v, int) and v > 0,
            "a positive integer (or unset for the preset's value)")
  for name in ("stoch_depth", "dropout"):
    check(f"model.{name}", lambda v: 0 <= v < 1, "in [0, 1)")
  for name, allowed in (("dtype", ("float32", "bfloat16", "float16")),
                        ("model.remat_policy", models.REMAT_POLICIES),
                        ("model.kernels", kernels.KERNELS)):
    if get(name) not in allowed:
      raise errors.ConfigError(
          f"config.{name}={get(name)!r} is not one of {', '.join(allowed)}.")
  if not isinstance(config.model.scan, bool):
    raise errors.ConfigError(f"config.model.scan={config.model.scan!r} must be True or False.")


def validate_config(config) -> None:
  """One clear sentence per bad value, before anything is compiled."""
  get, check = _checks(config)

  # image_size 0: the checkpoint's (init_from, or evaluate's --checkpoint).
  check("image_size", lambda v: v >= 0, "a positive number (or 0 for the checkpoint's)")
  for name in ("batch_size", "grad_accum_steps",
               "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
               "keep_checkpoints", "mesh_model"):
    check(name, lambda v: v > 0, "a positive number")
  for name in ("num_train_steps", "learning_rate", "warmup_steps", "weight_decay",
               "grad_clip_norm", "mixup_alpha", "cutmix_alpha", "randaugment_layers",
               "eval_batch_size",
               "num_classes", "end_learning_rate", "fewshot_every_steps",
               "train_crop_padding"):
    check(name, lambda v: v >= 0, "zero or positive")
  if config.num_train_steps == 0:
    check("num_epochs", lambda v: v > 0, "a positive number (or set num_train_steps)")
  check("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")
  check("randaugment_magnitude", lambda v: 0 <= v <= 30, "in [0, 30] (paper: 15)")
  check("eval_crop_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
  validate_model(config)
  _check_fewshot_layer(config)
  for name, allowed in (("loss", LOSSES), ("nonfinite", NONFINITE),
                        ("optimizer", optim.OPTIMIZERS), ("lr_decay", optim.SCHEDULES),
                        ("sharding", sharding.STRATEGIES),
                        ("train_crop", TRAIN_CROPS),
                        ("eval_preprocess", EVAL_PREPROCESSES),
                        ("randaugment_on", steps.RANDAUGMENT_ON)):
    if get(name) not in allowed:
      raise errors.ConfigError(
          f"config.{name}={get(name)!r} is not one of {', '.join(allowed)}.")


def resolve_randaugment_on(config) -> None:
  """config.randaugment_on "auto" -> "device" or "host" (steps.randaugment_on), once, at
  the entry point: the run record then holds where the augmentation ran."""
  if getattr(config, "randaugment_on", None) == "auto":
    config.randaugment_on = steps.randaugment_on(config)


def _check_fewshot_layer(config, blocks: Optional[int] = None) -> None:
  layer = config.get("fewshot_layer", "pre_logits")
  blocks = blocks or config.model.num_blocks
  m = re.fullmatch(r"block_(\d+)", str(layer))
  if layer != "pre_logits" and not (m and (blocks is None or int(m.group(1)) < blocks)):
    raise errors.ConfigError(
        f"config.fewshot_layer={layer!r} is not pre_logits or block_K with K in 0.."
        f"{(blocks or 1) - 1} (the model's blocks); probe one of them.")


def eval_batch_size(config, mesh) -> int:
  """The evaluation batch (default: one training micro-batch), checked against `mesh`."""
  size = config.eval_batch_size or config.batch_size // config.grad_accum_steps
  sharding.check_batch_size(size, 1, mesh, name="eval_batch_size")
  return size


def _weights_family(info: Dict[str, Any]) -> "models.Family":
  """The family of a weight file or workdir (`weights.load_params`'s info)."""
  if info.get("family"):
    return models.family_named(info["family"])
  try:  # Workdirs written before model.json named the family: their variant does.
    return models.preset(info.get("variant") or "")[0]
  except ValueError:
    return models.family_named("mixer")


def resolve_model(config, weights_info: Optional[Dict[str, Any]] = None,
                  source: str = "init_from") -> None:
  """Makes config.model concrete, once, before anything reads it.

  The preset `config.model.variant` ("B/16", "resmlp_24", ...) fills the fields left
  unset (None); variant "" takes them from `weights_info` (the init_from or
  --checkpoint file's `weights.load_params` info, named `source`), as does
  image_size 0. A field the family lacks is refused, and fields given beside a file
  must agree with it. Afterwards config.model holds the family, every field of its
  module, and the run's name (`models.model_name`: "B/16", "Mixer custom (...)").
  """
  m = config.model
  variant = str(m.variant or "").strip()
  recorded = checkpoint_fields(weights_info) if weights_info else None
  if variant:
    try:
      fam, filled = models.preset(variant)
    except ValueError as e:
      raise errors.ConfigError(f"config.model.variant: {e}") from None
  elif weights_info:
    fam, filled = _weights_family(weights_info), recorded
  elif getattr(m, "family", None):
    fam, filled = _family(m.family), {}
  else:
    raise errors.ConfigError(
        "config.model.variant is empty, which means init_from's architecture, but no "
        "config.init_from is set; set one, or a variant such as --config.model.variant=B/16.")
  if getattr(m, "family", None) and m.family != fam.name:
    raise errors.ConfigError(
        f"config.model.family={m.family!r} but variant {variant or source} is a "
        f"{fam.name} model; leave config.model.family unset.")
  name = variant or fam.name
  keys = list(m.keys() if hasattr(m, "keys") else vars(m))
  for key in keys:
    if key not in _NOT_FIELDS and key not in fam.fields and getattr(m, key) is not None:
      raise errors.ConfigError(
          f"config.model.{key}={getattr(m, key)!r} is not a field of {name} (a {fam.name} "
          f"model: {', '.join(k for k in fam.fields if k in keys)}); leave it unset.")
  defaults = {f.name: f.default for f in dataclasses.fields(fam.module)}
  for key in fam.fields:
    if key in keys and getattr(m, key) is None:
      value = filled.get(key, defaults[key])
      if value is dataclasses.MISSING:
        raise errors.ConfigError(f"config.model.{key} is unset and {name} gives none; set "
                                 f"--config.model.{key}.")
      setattr(m, key, value)
  m.family = fam.name
  if weights_info:
    _check_against_weights(config, weights_info, fam, source)
  validate_model(config)
  if fam.name == "gmlp" and m.channels_mlp_dim % 2:
    raise errors.ConfigError(
        f"gMLP's channels_mlp_dim={m.channels_mlp_dim} must be even: the spatial gating "
        "unit splits it in two halves.")
  m.name = models.model_name(fam.name, {k: getattr(m, k) for k in SIZE_FIELDS
                                         if k in fam.fields})


def resolve_from_weights(config, weights_info: Dict[str, Any], source: str) -> None:
  """`resolve_model` with every architecture field taken from the file (evaluation of
  a checkpoint: the config's own sizes are not the file's model)."""
  for key in _ARCHITECTURE:
    if hasattr(config.model, key):
      setattr(config.model, key, None)
  config.model.variant = ""
  resolve_model(config, weights_info, source)


def _family(name):
  try:
    return models.family_named(name)
  except ValueError as e:
    raise errors.ConfigError(f"config.model.family: {e}") from None


def _check_against_weights(config, info, fam, source) -> None:
  """image_size 0 takes the file's; the family and sizes must be the file's (a higher
  resolution may change tokens_mlp_dim: resolution.py)."""
  if not config.image_size:
    if not info.get("image_size"):
      raise errors.ConfigError(
          f"config.image_size=0 takes init_from's image size, but {source} does not record "
          "one; set --config.image_size.")
    config.image_size = int(info["image_size"])
  have = _weights_family(info)
  have_name = info.get("variant") or models.model_name(have.name, checkpoint_fields(info))
  if have.name != fam.name:
    raise errors.CheckpointError(
        f"config.model.variant={config.model.variant} is a {fam.name} model but init_from "
        f"{source} is a {have.name} ({have_name}); set "
        "--config.model.variant='' to take its architecture, or init from a checkpoint "
        "of this family.")
  hires = config.image_size != info.get("image_size")
  for key, value in checkpoint_fields(info).items():
    asked = getattr(config.model, key)
    if asked != value and not (key == "tokens_mlp_dim" and hires):
      raise errors.CheckpointError(
          f"config.model gives {key}={asked} (variant {config.model.variant or 'unset'}) but "
          f"init_from {source} was trained with {key}={value} (variant "
          f"{have_name}); set --config.model.variant='' to take its "
          "architecture, or init from a checkpoint of this variant.")


def size_fields(config) -> Dict[str, int]:
  """The resolved model's size fields (those of SIZE_FIELDS its family has)."""
  if getattr(config.model, "name", None) is None:
    resolve_model(config)
  fam = models.family_named(config.model.family)
  return {k: int(getattr(config.model, k)) for k in SIZE_FIELDS if k in fam.fields}


def model_fields(config, *, train: bool = True) -> Dict[str, Any]:
  """The resolved config's value of every field of its family's module, by name:
  config.model's, else the config's own (dtype, head_bias_init). `train=False` gives
  the evaluation model's: no stochastic depth, no dropout (the same parameter tree).
  A config that no entry point resolved is resolved here (resolve_model is idempotent)."""
  if getattr(config.model, "name", None) is None:
    resolve_model(config)
  fam = models.family_named(config.model.family)
  fields = {}
  for key in fam.fields:
    for node in (config.model, config):
      if hasattr(node, key):
        fields[key] = getattr(node, key)
        break
  if not train:
    fields.update(stoch_depth=0.0, dropout=0.0)
  return fields


def plain_model(config, num_classes: int, overrides: Optional[Dict[str, Any]] = None, *,
                train: bool = True):
  """The plain model of `config` (`overrides`: fields that differ, e.g. the
  higher-resolution tokens_mlp_dim)."""
  fields = {**model_fields(config, train=train), **(overrides or {})}
  return models.create_model(config.model.family, num_classes, **fields)


def build_model(config, num_classes: int, overrides: Optional[Dict[str, Any]] = None, *,
                train: bool = True):
  """The model of `config` as the steps compute it: config.model.kernels' forms
  (kernels/) around the plain model; without a mesh's batch constraint (Setup's)."""
  return kernels.Intercepted(plain_model(config, num_classes, overrides, train=train),
                             kernels.interceptors(config.model.kernels))


def checkpoint_fields(info: Dict[str, Any]) -> Dict[str, int]:
  return {k: int(v) for k, v in info["model"].items()}


def inference_model(info: Dict[str, Any], num_classes: int, dtype: str = "float32",
                    kernels_name: str = "auto"):
  """A checkpoint's evaluation model where no config exists (predict, export checks),
  computed with `kernels_name`'s forms."""
  model = models.create_model(_weights_family(info).name, num_classes,
                              **checkpoint_fields(info), dtype=dtype)
  return kernels.Intercepted(model, kernels.interceptors(kernels_name))


# ----------------------------------------------------------------- the state
class Setup:
  """Model, optimiser, mesh and shardings of one run; builds its state and steps.

  Attributes: config, num_classes, fields, model (training: stochastic depth and
  dropout on), eval_model, schedule, tx, mesh, abstract_state (ShapeDtypeStructs
  with their shardings), state_sharding, batch_sharding.
  """

  def __init__(self, config, num_classes: int, total_steps: int = 1, *,
               fields: Optional[Dict[str, Any]] = None, mesh=None):
    self.config, self.num_classes = config, num_classes
    resolve_randaugment_on(config)  # The train step and the input pipeline agree on it.
    # The size fields: config.model's, or `fields` where given (e.g. a checkpoint's).
    self.fields = {**size_fields(config), **(fields or {})}
    self.mesh = sharding.make_mesh(config.mesh_model) if mesh is None else mesh
    self._plain_model = plain_model(config, num_classes, self.fields)
    self.model = self._intercepted(self._plain_model)
    self.eval_model = self._intercepted(plain_model(config, num_classes, self.fields,
                                                    train=False))
    self.schedule, self.tx = optim.from_config(config, total_steps)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    shapes = jax.eval_shape(self._init, jax.random.key(config.seed))  # Shape errors here.
    self.state_sharding = self.shardings(shapes)
    self.abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
        self.state_sharding)

  def _intercepted(self, model):
    """`model` computed with config.model.kernels' faster forms (kernels/), its tokens'
    batch axis pinned to the mesh's data axis at each block (sharding.batch_constraint:
    it keeps a scanned, fsdp-sharded model data-parallel), both by interceptors."""
    blocks = tuple(f.block for f in models.families())
    return kernels.Intercepted(model, kernels.interceptors(self.config.model.kernels) + (
        sharding.batch_interceptor(self.mesh, blocks),))

  def shardings(self, tree):
    """The run's shardings (config.sharding's rules on this mesh) of a shape-only train
    state, or part of one, in either block layout: scanned parameters get the rules of
    each block's slice, their block axis whole (checkpoint.TrainCheckpoints converts
    with them)."""
    return sharding.state_shardings(tree, self.mesh, self.config.sharding,
                                    self.config.fsdp_min_size, stacked=models.is_stacked)

  def _init(self, rng):
    size = self.config.image_size
    # Initialised unrolled, then stacked if the model scans: the same seed gives the same
    # weights in either layout (nn.scan would split the rng per block differently).
    model = self._plain_model  # Initialised at batch 1: no batch constraint.
    unrolled = model.clone(scan=False)
    params = unrolled.init(rng, jnp.zeros((1, size, size, 3)), train=False)["params"]
    params = models.to_layout(params, models.model_layout(self.model))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def feature_model(self):
    """The evaluation model without its head, for the few-shot probes: its pooled
    pre-logits, or with config.fewshot_layer="block_K" block K's tokens averaged."""
    model = self._intercepted(plain_model(self.config, 0, self.fields, train=False))
    layer = self.config.get("fewshot_layer", "pre_logits")
    if layer == "pre_logits":
      return model
    _check_fewshot_layer(self.config, self.fields["num_blocks"])  # The checkpoint's depth.
    return models.block_features(model, int(layer[len("block_"):]))

  def place_params(self, params):
    """Host numpy parameters (the same on every process), in either block layout (the
    released unrolled one or the scanned one) -> global arrays in the model's, sharded."""
    params = models.to_layout(params, models.model_layout(self.model))
    return place(params, self.state_sharding["params"])

  @property
  def num_params(self) -> int:
    return models.count_params(self.abstract_state["params"])

  def init_state(self):
    """A fresh train state from config.seed, laid out by the shardings."""
    return jax.jit(self._init, out_shardings=self.state_sharding)(
        jax.random.key(self.config.seed))

  def state_with_params(self, params):
    """Step 0 with `params` (numpy, e.g. pre-trained, either block layout) and a fresh
    optimiser state."""
    params = self.place_params(params)
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), self.state_sharding["step"]),
            "params": params, "opt_state": opt_state}

  def train_step(self):
    """(state, global batch) -> (state, metrics), jitted with the state donated."""
    step = steps.make_train_step(self.model, self.tx, self.config, self.num_classes)
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

  def eval_step(self, model=None, confusion: bool = False):
    """(params, global batch) -> sums over its real examples, replicated."""
    step = steps.make_eval_step(model or self.eval_model, self.config, self.num_classes,
                                confusion)
    return jax.jit(step, out_shardings=sharding.replicated(self.mesh))

  def abstract_batch(self, batch_size: int):
    """ShapeDtypeStructs of a global training batch (for lowering without data): uint8
    images, as the input pipeline ships them."""
    size = self.config.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8,
                                          sharding=self.batch_sharding),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                          sharding=self.batch_sharding)}


def place(tree, shardings):
  """Host numpy arrays (the same on every process) -> global arrays with `shardings`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)
