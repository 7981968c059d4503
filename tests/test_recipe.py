"""The paper's pre-training recipe (issue 4): configs, mixup, stochastic depth and
dropout, gradient accumulation, bf16, sigmoid loss, folder data, and one end-to-end
run of configs/imagenet1k_pretrain.py on a generated image folder with every
augmentation on."""

import glob
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw
import pytest

from conftest import run_main, set_overrides
from configs import common
from configs import imagenet
from configs import imagenet1k_pretrain
from configs import imagenet21k_pretrain
from mixer_jax import models
from mixer_jax import optim
from mixer_jax import train

I1K = "configs/imagenet1k_pretrain.py:B/16"
NUM_CLASSES = 5
TINY = dict(patch_size=4, num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


# ------------------------------------------------------------------------- data
def _shape_image(rng, size=40):
  """A random background with a random ellipse or rectangle of another colour."""
  colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))
  image = Image.new("RGB", (size, size), colour())
  draw = ImageDraw.Draw(image)
  x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
  x1, y1 = (int(v) for v in rng.integers(size // 2 + 4, size, 2))
  shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
  shape([x0, y0, x1, y1], fill=colour())
  return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """3 classes x 8 JPEGs (40x40) + a grayscale and an RGBA PNG + one corrupt JPEG."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / f"class_{c}")
    for i in range(8):
      _shape_image(rng).save(root / f"class_{c}" / f"img_{i}.jpg", quality=90)
  Image.fromarray(rng.integers(0, 256, (40, 40), np.uint8), "L").save(root / "class_0" / "gray.png")
  Image.fromarray(rng.integers(0, 256, (40, 40, 4), np.uint8), "RGBA").save(
      root / "class_1" / "rgba.png")
  corrupt = root / "class_2" / "broken.jpg"
  jpeg = (root / "class_2" / "img_0.jpg").read_bytes()
  corrupt.write_bytes(jpeg[:len(jpeg) // 3])  # A truncated JPEG: header fine, data cut.
  return str(root), str(corrupt)


# ---------------------------------------------------------------------- configs
# Paper (arXiv 2105.01601) Table 4 and Section 3, written here independently of the
# config files: (RandAugment magnitude, mixup) per dataset and size; the rest shared.
TABLE4 = {("i1k", "B"): (15, 0.5), ("i1k", "L"): (15, 0.5),
          ("i21k", "B"): (10, 0.2), ("i21k", "L"): (20, 0.5)}
SHARED = dict(num_epochs=300, learning_rate=0.001, weight_decay=0.1, dropout=0.0,
              stoch_depth=0.1, optimizer="adam", b1=0.9, b2=0.999, grad_clip_norm=1.0,
              warmup_steps=10_000, lr_decay="linear", batch_size=4096, image_size=224,
              randaugment_layers=2, train_crop="inception", train_flip=True)
CONFIGS = {"i1k": imagenet1k_pretrain, "i21k": imagenet21k_pretrain}


@pytest.mark.parametrize("data,variant", [("i1k", "B/16"), ("i1k", "L/16"), ("i1k", "B/32"),
                                          ("i21k", "B/16"), ("i21k", "L/16"), ("i21k", "L/32")])
def test_configs_hold_the_paper_table4_values(data, variant):
  c = CONFIGS[data].get_config(variant)
  magnitude, mixup_alpha = TABLE4[(data, variant[0])]
  assert c.model.variant == variant
  assert c.randaugment_magnitude == magnitude
  assert c.mixup_alpha == mixup_alpha
  got = dict(num_epochs=c.num_epochs, learning_rate=c.learning_rate,
             weight_decay=c.weight_decay, dropout=c.model.dropout,
             stoch_depth=c.model.stoch_depth, optimizer=c.optimizer, b1=c.b1, b2=c.b2,
             grad_clip_norm=c.grad_clip_norm, warmup_steps=c.warmup_steps,
             lr_decay=c.lr_decay, batch_size=c.batch_size, image_size=c.image_size,
             randaugment_layers=c.randaugment_layers, train_crop=c.train_crop,
             train_flip=c.train_flip)
  assert got == SHARED
  # Decay to zero, the trainer derives the steps from 300 epochs, global batch kept.
  assert c.end_learning_rate == 0.0 and c.num_train_steps == 0 and c.grad_accum_steps == 1
  assert c.dtype == "bfloat16" and c.loss == "sigmoid"
  train.validate_config(c)
  # Every key is one the trainer knows (configs only set keys of the base config).
  assert set(c.keys()) == set(common.base_config().keys())


def test_imagenet1k_config_data_eval_and_length():
  c = imagenet1k_pretrain.get_config()  # Default variant: B/16.
  assert c.model.variant == "B/16"
  assert (c.dataset, c.train_split, c.eval_split) == ("imagenet2012", "train", "validation")
  assert c.eval_preprocess == "resize_crop" and c.eval_crop_fraction == 0.875
  assert c.head_bias_init == pytest.approx(math.log(1 / 1000), abs=0.01)
  # ImageNet-1k train: 1,281,167 images; 300 epochs at 4096 -> ~93.8k steps.
  assert train.total_train_steps(c, 1_281_167) == 93_835
  # Paper-size model (Table 1 / REFERENCE.md count), from shapes only.
  model = train.build_model(c, 1000, train.model_fields(c, 1000))
  assert models.count_params(models.param_shapes(model, 224)) == 59_880_472


def test_imagenet21k_config_holds_out_eval_images():
  c = imagenet21k_pretrain.get_config("L/16")
  assert c.eval_split == "train[:50000]" and c.train_split == "train[50000:]"
  assert c.head_bias_init == pytest.approx(math.log(1 / 21_843), abs=0.01)


def test_imagenet_config_is_the_imagenet1k_recipe():
  assert imagenet.get_config().to_dict() == imagenet1k_pretrain.get_config().to_dict()
  assert imagenet.get_config("L/16").to_dict() == imagenet1k_pretrain.get_config("L/16").to_dict()


@pytest.mark.parametrize("module", [imagenet1k_pretrain, imagenet21k_pretrain, imagenet])
@pytest.mark.parametrize("arg", ["S/16", "H/14", "B16", "X/16"])
def test_configs_reject_unknown_variants_in_one_sentence(module, arg):
  with pytest.raises(ValueError, match=r"^Unknown variant .*use one of B/16, B/32, L/16, L/32"
                     ) as info:
    module.get_config(arg)
  assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ mixup
def test_mixup_mixes_images_and_labels_with_the_same_lambda():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (6, 4, 4, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 4, 0]), NUM_CLASSES)
  for seed in range(5):
    mixed_x, mixed_y = train.mixup(jax.random.key(seed), images, labels, 0.5)
    partner_x, partner_y = jnp.roll(images, 1, 0), jnp.roll(labels, 1, 0)
    # Recover lambda from the images: mixed = lam * x + (1 - lam) * partner.
    lam = float(jnp.sum((mixed_x - partner_x) * (images - partner_x)) /
                jnp.sum((images - partner_x) ** 2))
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed_x, lam * images + (1 - lam) * partner_x, atol=1e-6)
    np.testing.assert_allclose(mixed_y, lam * labels + (1 - lam) * partner_y, atol=1e-6)
    np.testing.assert_allclose(mixed_y.sum(-1), 1.0, atol=1e-6)


def test_mixup_weight_is_beta_alpha_alpha():
  labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  images = jnp.zeros((2, 1, 1, 3))
  lams = np.array([float(train.mixup(jax.random.key(i), images, labels, 0.5)[1][0, 0])
                   for i in range(2000)])
  # Beta(0.5, 0.5): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 1/8, U-shaped.
  assert np.all((lams >= 0) & (lams <= 1))
  assert abs(lams.mean() - 0.5) < 0.03
  assert abs(lams.var() - 0.125) < 0.015
  assert np.mean((lams < 0.1) | (lams > 0.9)) > 0.35  # Beta(.5,.5): 0.41; uniform: 0.2.


# ------------------------------------------------------------- tiny model helpers
def _config(**overrides):
  c = common.base_config()
  c.model.variant = "S/4"
  for k, v in TINY.items():
    c.model[k] = v
  c.image_size = 16
  c.dtype = "float32"
  return set_overrides(c, overrides)


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)}


_PARAMS = {}


def _state(model, tx, seed=0):
  """Initial train state; params cached per model (jitting the init costs seconds)."""
  # Parameters (float32, train=False at init) do not depend on dtype or the rates.
  model = model.clone(dtype=jnp.float32, stoch_depth=0.0, dropout=0.0)
  key = (repr(model), seed)
  if key not in _PARAMS:
    params = models.init_params(model, 16, jax.random.key(seed))
    # The head kernel starts at zero (paper), so nothing before it would reach the loss:
    # give it random values so that dropout / stochastic depth upstream are visible.
    params["head"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(seed + 1),
                                                       params["head"]["kernel"].shape)
    _PARAMS[key] = params
  params = _PARAMS[key]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def _tx(config, total_steps=10):
  schedule = optim.learning_rate_schedule(config.learning_rate, total_steps,
                                          config.warmup_steps, config.lr_decay)
  return optim.make_optimizer(name=config.optimizer, schedule=schedule, b1=config.b1,
                              b2=config.b2, eps=config.eps, momentum=config.momentum,
                              weight_decay=config.weight_decay,
                              grad_clip_norm=config.grad_clip_norm)


def _compile(fn, *example_args):
  """jax.jit(fn) compiled for these argument shapes with XLA's CPU backend optimisations
  off: the same computation, in half the compile time (which dominates these tests)."""
  return jax.jit(fn).lower(*example_args).compile(
      compiler_options={"xla_backend_optimization_level": 0})


_COMPILED = {}


def _step(config, state=None, batch=None, step=0):
  """One train step; compiled once per config."""
  key = config.to_json()
  if key not in _COMPILED:
    model = train.build_model(config, NUM_CLASSES, train.model_fields(config, NUM_CLASSES))
    tx = _tx(config)
    step_fn = train.make_train_step(model, tx, config, NUM_CLASSES)
    _COMPILED[key] = (model, tx, step_fn,
                      _compile(step_fn, _state(model, tx), _batch()))
  model, tx, _, compiled = _COMPILED[key]
  state = state or _state(model, tx)
  state = dict(state, step=jnp.asarray(step, jnp.int32))
  return compiled(state, batch or _batch())


# -------------------------------------------------------- gradient accumulation
def _analytically_zero_grad(path) -> bool:
  """The token-mixing output bias adds one constant to every channel of a token, which
  each following LayerNorm (over channels) subtracts again: its exact gradient is 0,
  the computed one is rounding noise (~1e-5) that Adam blows up to +-lr."""
  keys = [getattr(k, "key", None) for k in path]
  return "token_mixing" in keys and "Dense_1" in keys and keys[-1] == "bias"


# The pre-training chain: clip (active: grad norm > 0.05) -> Adam -> decoupled wd.
ADAM = dict(optimizer="adam", learning_rate=1e-3, warmup_steps=0, lr_decay="linear",
            grad_clip_norm=0.05, weight_decay=0.1, loss="sigmoid", head_bias_init=-6.9,
            label_smoothing=0.1)
# Every train-time regulariser on, in bf16.
REGULARISED = dict(dtype="bfloat16", grad_accum_steps=2, mixup_alpha=0.5,
                   **{"model.stoch_depth": 0.1, "model.dropout": 0.1})


def test_accumulated_micro_batches_give_the_large_batch_update():
  """k=4 micro-batches of 4 vs one batch of 16, through the recipe's whole chain
  (clipping, Adam, decoupled weight decay): the same parameters and optimiser state.
  The state holds Adam's first moment mu = 0.1 * clipped gradient, so the gradients
  themselves agree too (and with them the update of any optimiser, e.g. SGD)."""
  one = _config(grad_accum_steps=1, **ADAM)
  four = _config(grad_accum_steps=4, **ADAM)
  model = train.build_model(one, NUM_CLASSES, train.model_fields(one, NUM_CLASSES))
  state = _state(model, _tx(one))
  new_one, m_one = _step(one, state)
  new_four, m_four = _step(four, state)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 new_one["params"], state["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # The update is not trivial.
  assert float(m_one["grad_norm"]) > ADAM["grad_clip_norm"]  # Clipping is active.
  compared = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new_one),
                          jax.tree_util.tree_leaves(new_four)):
    if _analytically_zero_grad(path):
      continue
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    compared += 1
  assert compared >= 20
  np.testing.assert_allclose(m_one["loss"], m_four["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_one["grad_norm"], m_four["grad_norm"], rtol=1e-5)


# ----------------------------------------------------------------------- bf16
def _equations(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (jit, scan, vjp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for name, value in eqn.params.items():
      if eqn.primitive.name == "cond" and name == "branches":
        value = value[:1]  # Alternatives: one of them runs.
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_bfloat16_computes_in_bf16_with_float32_params_state_and_metrics():
  config = _config(**REGULARISED)
  model = train.build_model(config, NUM_CLASSES, train.model_fields(config, NUM_CLASSES))
  new_state, metrics = _step(config)
  for leaf in jax.tree_util.tree_leaves((new_state["params"], new_state["opt_state"])):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  for name, value in metrics.items():
    assert value.dtype == jnp.float32, name
    assert np.isfinite(value), name
  # Output dtypes of every Dense/Conv, from tracing alone (nothing is computed).
  logits, captured = jax.eval_shape(lambda p, x: model.apply(
      {"params": p}, x, train=False,
      capture_intermediates=lambda mdl, _: isinstance(mdl, (nn.Dense, nn.Conv)),
      mutable=["intermediates"]), new_state["params"], _batch()["image"])
  assert logits.dtype == jnp.float32
  outputs = jax.tree_util.tree_leaves(captured)
  # stem + 1 block x 2 MLPs x 2 Dense + head.
  assert len(outputs) == 1 + 2 * 2 + 1
  assert all(o.dtype == jnp.bfloat16 for o in outputs)
  # And in the train step itself (forward and backward, inside the accumulation scan):
  # every matrix multiply takes bf16 operands.
  model, tx, step_fn, _ = _COMPILED[config.to_json()]
  jaxpr = jax.make_jaxpr(step_fn)(_state(model, tx), _batch())
  dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in ("dot_general", "conv_general_dilated")]
  # 6 layers (stem, 4 Dense, head): 6 forward, 6 kernel gradients, 6 input gradients
  # (the stem's custom VJP also writes the images' gradient, which XLA drops as unused).
  # Products written per platform (lax.platform_dependent in models.Dense) are counted
  # in one branch.
  assert len(dots) == 6 + 6 + 6
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  for kind in ("softmax", "sigmoid"):  # bf16 logits in: a float32 loss out.
    loss = train.loss_fn(jnp.zeros(logits.shape, jnp.bfloat16),
                         jax.nn.one_hot(_batch()["label"], NUM_CLASSES), kind)
    assert loss.dtype == jnp.float32


# ------------------------------------------------ stochastic depth and dropout
def test_config_wires_stochastic_depth_and_dropout_into_the_model():
  # Two blocks: the first block's stochastic-depth rate is always 0.
  config = _config(**{"model.stoch_depth": 0.3, "model.dropout": 0.2, "model.num_blocks": 2})
  fields = train.model_fields(config, NUM_CLASSES)
  model = train.build_model(config, NUM_CLASSES, fields)
  assert (model.stoch_depth, model.dropout) == (0.3, 0.2)
  eval_model = train.build_model(config, NUM_CLASSES, fields, train=False)
  assert (eval_model.stoch_depth, eval_model.dropout) == (0.0, 0.0)

  params = _state(model, _tx(config))["params"]
  images, labels = _batch()["image"], jax.nn.one_hot(_batch()["label"], NUM_CLASSES)
  # Stochastic depth alone (no dropout) must make the loss depend on the rng too.
  sd_model = train.build_model(_config(**{"model.stoch_depth": 0.5, "model.num_blocks": 2}),
                               NUM_CLASSES, fields)

  def losses(key):
    loss = lambda m, train_: train.loss_fn(m.apply({"params": params}, images, train=train_,
                                                   rngs={"dropout": key}), labels, "softmax")
    return loss(model, True), loss(model, False), loss(sd_model, True)

  losses = _compile(losses, jax.random.key(0))
  train_mode, eval_mode, sd_only = zip(*[map(float, losses(jax.random.key(i)))
                                         for i in range(3)])
  assert len(set(train_mode)) == 3  # Train mode: every dropout rng gives another loss.
  assert len(set(sd_only)) == 3
  assert len(set(eval_mode)) == 1  # Eval mode: deterministic.


def test_train_step_draws_a_new_dropout_rng_every_step():
  """Same state and batch, another step number: dropout (the only random part here)
  gives another loss; without it the loss is the same."""
  with_dropout = _config(grad_accum_steps=1, **ADAM, **{"model.dropout": 0.1})
  losses = [float(_step(with_dropout, step=s)[1]["loss"]) for s in (0, 1, 7)]
  assert len(set(losses)) == 3
  plain = _config(grad_accum_steps=1, **ADAM)
  losses = [float(_step(plain, step=s)[1]["loss"]) for s in (0, 1, 7)]
  assert len(set(losses)) == 1


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_drop_path_drops_whole_examples_at_the_rate_and_rescales_the_rest(rate):
  n = 20_000
  y = np.asarray(models.drop_path(jnp.ones((n, 3, 4)), rate, jax.random.key(0)))
  per_example = y.reshape(n, -1)
  assert np.all(per_example == per_example[:, :1])  # One decision per example.
  dropped = per_example[:, 0] == 0
  assert abs(dropped.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(per_example[~dropped], 1 / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("branch", ["token_mixing", "channel_mixing"])
def test_mixer_block_drops_each_residual_branch_at_its_rate(branch):
  """Silence the other branch; then block(x) - x is 0 or branch(x) / (1 - rate)."""
  rate, n = 0.5, 2000
  block = models.MixerBlock(tokens_mlp_dim=8, channels_mlp_dim=16, stoch_depth=rate)
  x = jax.random.normal(jax.random.key(0), (n, 4, 8))
  params = block.init(jax.random.key(1), x[:1])["params"]
  other = "channel_mixing" if branch == "token_mixing" else "token_mixing"
  params[other]["Dense_1"] = jax.tree_util.tree_map(jnp.zeros_like, params[other]["Dense_1"])
  both = lambda key: (block.apply({"params": params}, x, False) - x,
                      block.apply({"params": params}, x, True, rngs={"dropout": key}) - x)
  full, got = map(np.asarray, _compile(both, jax.random.key(2))(jax.random.key(2)))
  assert np.abs(full).max(axis=(1, 2)).min() > 1e-3  # The branch is never 0 itself.
  dropped = np.all(np.abs(got) < 1e-6, axis=(1, 2))
  assert abs(dropped.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(got[~dropped], full[~dropped] / (1 - rate), rtol=1e-4, atol=1e-5)


def test_stochastic_depth_rate_grows_linearly_from_zero_to_the_last_block():
  model = models.create_model("S/4", NUM_CLASSES, **dict(TINY, num_blocks=3), stoch_depth=0.3)
  params = models.param_shapes(model, 16)
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.MixerBlock) and context.method_name == "__call__":
      rates[context.module.name] = context.module.stoch_depth
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # Records while tracing; nothing is computed.
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, train=True,
                                            rngs={"dropout": jax.random.key(0)}),
                   params, _batch(2)["image"])
  assert rates == pytest.approx({"MixerBlock_0": 0.0, "MixerBlock_1": 0.15,
                                 "MixerBlock_2": 0.3})


# ---------------------------------------------------------------- sigmoid loss
def test_sigmoid_loss_with_head_bias_init():
  config = _config(grad_accum_steps=1, **ADAM)
  model = train.build_model(config, NUM_CLASSES, train.model_fields(config, NUM_CLASSES))
  params = models.init_params(model, 16)
  batch = _batch()
  logits = model.apply({"params": params}, batch["image"], train=False)
  np.testing.assert_array_equal(logits, np.full(logits.shape, -6.9, np.float32))
  labels = jax.nn.one_hot(batch["label"], NUM_CLASSES)
  loss = float(train.loss_fn(logits, labels, "sigmoid"))
  # Per example: softplus(6.9) for the true class + (K - 1) softplus(-6.9) for the rest.
  softplus = lambda v: math.log1p(math.exp(v))
  assert loss == pytest.approx(softplus(6.9) + (NUM_CLASSES - 1) * softplus(-6.9), rel=1e-5)
  _, metrics = _step(config)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])


# ------------------------------------------------------------ the whole recipe
def _lines(text):
  return [l for l in text.splitlines() if l.strip()]


def test_corrupt_image_in_a_folder_is_one_error_line_naming_it(image_folder, tmp_path):
  root, corrupt = image_folder
  result = run_main([f"--workdir={tmp_path / 'w'}", f"--config.dataset=folder:{root}"],
                    config=I1K, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  naming = [l for l in _lines(result.stderr) if corrupt in l]
  assert len(naming) == 1 and naming[0].startswith("Error: Image file ")
  assert "skip_corrupt_images" in naming[0]
  assert _lines(result.stderr)[-1] == naming[0]


def test_imagenet1k_recipe_trains_on_an_image_folder_with_every_augmentation(image_folder,
                                                                             tmp_path):
  root, corrupt = image_folder
  workdir = tmp_path / "w"
  args = {
      "dataset": f"folder:{root}", "skip_corrupt_images": True,
      "image_size": 32, "model.patch_size": 8, "model.num_blocks": 1,
      "model.hidden_dim": 16, "model.tokens_mlp_dim": 8, "model.channels_mlp_dim": 32,
      "batch_size": 8, "grad_accum_steps": 2, "dtype": "bfloat16", "num_train_steps": 3,
      "warmup_steps": 1, "eval_split": "train", "log_every_steps": 3,
      "eval_every_steps": 3, "checkpoint_every_steps": 3, "shuffle_buffer": 64,
      # Every augmentation and regulariser on.
      "train_crop": "inception", "train_flip": True, "randaugment_layers": 2,
      "randaugment_magnitude": 15, "mixup_alpha": 0.5, "model.stoch_depth": 0.1,
      "model.dropout": 0.1, "label_smoothing": 0.1, "log_image_grid": True,
  }
  # XLA's CPU backend optimisations only cost compile time for these 3 tiny steps.
  result = run_main([f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in args.items()],
                    config=I1K, timeout=240,
                    env_extra={"XLA_FLAGS": "--xla_backend_optimization_level=0"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Skipping 1 corrupt image file(s)" in result.stderr and corrupt in result.stderr

  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if "train/loss" in r]
  eval_rows = [r for r in rows if "eval/accuracy" in r]
  assert train_rows and eval_rows
  assert all(isinstance(r["train/loss"], float) and math.isfinite(r["train/loss"])
             for r in train_rows)
  assert 0.0 <= eval_rows[-1]["eval/accuracy"] <= 1.0
  # 24 JPEGs + the grayscale and RGBA PNGs, each once; the corrupt file left out.
  assert eval_rows[-1]["eval/num_examples"] == 26
  assert os.path.isdir(workdir / "checkpoints" / "3")

  import tensorflow as tf
  events = glob.glob(str(workdir / "events.out.tfevents.*"))
  assert events
  grids = []
  for path in events:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/augmented_images":
          assert value.metadata.plugin_data.plugin_name == "images"
          grids.append(tf.io.decode_png(value.tensor.string_val[2]).numpy())
  assert len(grids) == 1
  # 8 images of 32x32 on a 3x3 grid, with real (varied) content.
  assert grids[0].shape == (96, 96, 3) and grids[0][:64].std() > 5
