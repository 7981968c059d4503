"""One setup path: model, optimiser, train state, shardings and jitted steps from a config.

Every entry point (train, evaluate, predict, memory, benchmark) builds what a step
needs here, so a new model family, optimiser or sharding rule is wired once. No
TensorFlow, tfds, ml_collections or clu import: the benchmark runs this on GPU images
that lack them, so `config` only needs attribute access (a ConfigDict from configs/
or any object with the same fields).

  setup = state.Setup(config, num_classes, total_steps)  # or fields= a checkpoint's
  train_state = setup.init_state()
  train_step = setup.train_step()            # jitted, sharded, state donated
  sums = setup.eval_step()(params, batch)   # jitted, replicated sums
"""

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import errors
from mixer_jax import models
from mixer_jax import optim
from mixer_jax import sharding
from mixer_jax import steps

# config.model's size fields: the Mixer's five; ResMLP and gMLP have all but tokens_mlp_dim.
SIZE_FIELDS = ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim")
LOSSES = ("softmax", "sigmoid")
NONFINITE = ("stop", "skip")
TRAIN_CROPS = ("inception", "resize", "pad", "none")
EVAL_PREPROCESSES = ("resize_crop", "resize")


# ------------------------------------------------------------------ the config
def validate_config(config) -> None:
  """One clear sentence per bad value, before anything is compiled."""
  def get(name):
    return (getattr(config, name) if "." not in name
            else getattr(config.model, name.split(".", 1)[1]))

  def check(name, ok, requirement):
    value = get(name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and ok(value)):
      raise errors.ConfigError(f"config.{name}={value!r} must be {requirement}.")

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
  for name in SIZE_FIELDS:
    check(f"model.{name}", lambda v: isinstance(v, int) and v >= 0,
          "a positive integer (or 0 for the variant's value)")
  for name, allowed in (("loss", LOSSES), ("nonfinite", NONFINITE),
                        ("optimizer", optim.OPTIMIZERS), ("lr_decay", optim.SCHEDULES),
                        ("sharding", sharding.STRATEGIES),
                        ("train_crop", TRAIN_CROPS),
                        ("eval_preprocess", EVAL_PREPROCESSES),
                        ("dtype", ("float32", "bfloat16", "float16")),
                        ("model.remat_policy", models.REMAT_POLICIES)):
    if get(name) not in allowed:
      raise errors.ConfigError(
          f"config.{name}={get(name)!r} is not one of {', '.join(allowed)}.")
  if not isinstance(config.model.scan, bool):
    raise errors.ConfigError(f"config.model.scan={config.model.scan!r} must be True or False.")


def eval_batch_size(config, mesh) -> int:
  """The evaluation batch (default: one training micro-batch), checked against `mesh`."""
  size = config.eval_batch_size or config.batch_size // config.grad_accum_steps
  sharding.check_batch_size(size, 1, mesh, name="eval_batch_size")
  return size


def model_fields(config) -> Dict[str, int]:
  """The model's size fields: the variant's, where config.model does not set them.

  The variant names the family (a Mixer "B/16", a ResMLP "resmlp_12", a gMLP
  "gmlp_s16"); a size field the family lacks (tokens_mlp_dim for ResMLP and gMLP)
  must be 0.
  """
  if not config.model.variant:
    raise errors.ConfigError(
        "config.model.variant is empty, which means init_from's architecture, but no "
        "config.init_from is set; set one, or a variant such as --config.model.variant=B/16.")
  try:
    sizes = models.variant_sizes(config.model.variant)
  except ValueError as e:
    raise errors.ConfigError(f"config.model.variant: {e}") from None
  for key in SIZE_FIELDS:
    if key not in sizes and getattr(config.model, key):
      raise errors.ConfigError(
          f"config.model.{key}={getattr(config.model, key)!r} is not a size of "
          f"{config.model.variant} (a {models.family(config.model.variant).name} model: "
          f"{', '.join(sizes)}); set --config.model.{key}=0.")
  return {k: int(getattr(config.model, k) or v) for k, v in sizes.items()}


def family_name(variant: str) -> str:
  """"mixer", "resmlp" or "gmlp": the family a variant name belongs to."""
  try:
    return models.family(variant).name
  except ValueError as e:
    raise errors.ConfigError(f"config.model.variant: {e}") from None


def build_model(config, num_classes: int, fields: Optional[Dict[str, int]] = None, *,
                train: bool = True, variant: Optional[str] = None):
  """The model of `config` (size fields from `fields` if given, e.g. a checkpoint's).

  `train=False` gives the evaluation model: no stochastic depth, no dropout (the
  parameter tree is the same).
  """
  fields = model_fields(config) if fields is None else fields
  # With every size field given, the variant's letter only names the family.
  variant = variant or config.model.variant
  try:
    return models.create_model(
        variant, num_classes, **fields,
        stoch_depth=config.model.stoch_depth if train else 0.0,
        dropout=config.model.dropout if train else 0.0,
        dtype=config.dtype, head_bias_init=config.head_bias_init,
        remat_policy=config.model.remat_policy, scan=config.model.scan,
        kernels=config.model.kernels)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def checkpoint_variant(info: Dict[str, Any]) -> str:
  """The variant name for a checkpoint's model (`weights.load_params`'s info).

  Released Mixer files do not name theirs; every size field is given then, so the
  letter is unused and only the family matters.
  """
  return info.get("variant") or f"S/{int(info['model']['patch_size'])}"


def checkpoint_fields(info: Dict[str, Any]) -> Dict[str, int]:
  return {k: int(v) for k, v in info["model"].items()}


def inference_model(info: Dict[str, Any], num_classes: int, dtype: str = "float32"):
  """A checkpoint's evaluation model where no config exists (predict, export checks)."""
  return models.create_model(checkpoint_variant(info), num_classes,
                             **checkpoint_fields(info), dtype=dtype)


# ----------------------------------------------------------------- the state
class Setup:
  """Model, optimiser, mesh and shardings of one run; builds its state and steps.

  Attributes: config, num_classes, fields, model (training: stochastic depth and
  dropout on), eval_model, schedule, tx, mesh, abstract_state (ShapeDtypeStructs
  with their shardings), state_sharding, batch_sharding.
  """

  def __init__(self, config, num_classes: int, total_steps: int = 1, *,
               fields: Optional[Dict[str, int]] = None, variant: Optional[str] = None,
               mesh=None):
    self.config, self.num_classes, self.variant = config, num_classes, variant
    self.fields = model_fields(config) if fields is None else dict(fields)
    self.mesh = sharding.make_mesh(config.mesh_model) if mesh is None else mesh
    self._plain_model = build_model(config, num_classes, self.fields, variant=variant)
    self.model = self._constrained(self._plain_model)
    self.eval_model = self._constrained(build_model(config, num_classes, self.fields,
                                                    train=False, variant=variant))
    self.schedule, self.tx = optim.from_config(config, total_steps)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    shapes = jax.eval_shape(self._init, jax.random.key(config.seed))  # Shape errors here.
    self.state_sharding = self.shardings(shapes)
    self.abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
        self.state_sharding)

  def _constrained(self, model):
    """`model` with its tokens' batch axis pinned to the mesh's data axis in the steps
    (sharding.batch_constraint; families without the `constrain` hook run as they are)."""
    if not hasattr(model, "constrain"):
      return model
    return model.clone(constrain=sharding.batch_constraint(self.mesh))

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
    unrolled = model.clone(scan=False) if hasattr(model, "scan") else model
    params = unrolled.init(rng, jnp.zeros((1, size, size, 3)), train=False)["params"]
    params = models.to_layout(params, models.model_layout(self.model))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def feature_model(self):
    """The evaluation model without its head: pooled pre-logits (few-shot probes)."""
    return self._constrained(build_model(self.config, 0, self.fields, train=False,
                                         variant=self.variant))

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
    """ShapeDtypeStructs of a global training batch (for lowering without data)."""
    size = self.config.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32,
                                          sharding=self.batch_sharding),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                          sharding=self.batch_sharding)}


def place(tree, shardings):
  """Host numpy arrays (the same on every process) -> global arrays with `shardings`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)
