"""steps.py, the pure train and eval steps: mixup, gradient accumulation through the
whole pre-training chain, bfloat16 compute, stochastic depth and dropout in the train
step (off in evaluation), the sigmoid loss with the head-bias init, and label
smoothing; on a one-block model at 16 px, each step compiled once per config."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import set_overrides
from configs import common
from mixer_jax import models
from mixer_jax import optim
from mixer_jax import state as state_lib
from mixer_jax import steps

NUM_CLASSES = 5
TINY = dict(patch_size=4, num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


# ------------------------------------------------------------------------ mixup
def test_mixup_mixes_images_and_labels_with_the_same_lambda():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (6, 4, 4, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 4, 0]), NUM_CLASSES)
  for seed in range(5):
    mixed_x, mixed_y = steps.mixup(jax.random.key(seed), images, labels, 0.5)
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
  lams = np.array([float(steps.mixup(jax.random.key(i), images, labels, 0.5)[1][0, 0])
                   for i in range(2000)])
  # Beta(0.5, 0.5): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 1/8, U-shaped.
  assert np.all((lams >= 0) & (lams <= 1))
  assert abs(lams.mean() - 0.5) < 0.03
  assert abs(lams.var() - 0.125) < 0.015
  assert np.mean((lams < 0.1) | (lams > 0.9)) > 0.35  # Beta(.5,.5): 0.41; uniform: 0.2.


def test_cutmix_pastes_one_box_and_mixes_labels_by_its_area():
  images = jnp.broadcast_to(jnp.arange(6.0)[:, None, None, None], (6, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 4, 0]), NUM_CLASSES)
  keys = jax.random.split(jax.random.key(0), 16)
  # One program: CutMix alone, and mixed with mixup (the DeiT recipe's switch).
  mixed_x, mixed_y, both = map(np.asarray, jax.jit(jax.vmap(lambda key: (
      *steps.cutmix(key, images, labels, 1.0),
      steps.mix_batch(key, images, labels, 0.8, 1.0)[0])))(keys))
  partner_x, partner_y = np.roll(images, 1, 0), np.roll(labels, 1, 0)
  areas = []
  for x, y in zip(mixed_x, mixed_y):
    box = x[1, :, :, 0] != 1.0  # Example 1 shows example 0 inside the box.
    np.testing.assert_array_equal(x, np.where(box[None, :, :, None], partner_x, images))
    if box.any():  # One rectangle.
      rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
      assert box.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (
          cols[-1] - cols[0] + 1)
    np.testing.assert_allclose(y, (1 - box.mean()) * labels + box.mean() * partner_y,
                               atol=1e-6)
    areas.append(box.mean())
  assert 0.1 < np.mean(areas) < 0.6 and max(areas) > 0.3  # Beta(1, 1), clipped boxes.
  # Both on: one of the two per batch, the choice a function of the rng.
  is_cut = [bool(np.isin(x, np.arange(6.0)).all()) for x in both]
  assert 3 <= sum(is_cut) <= 13


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
  """A batch as the input pipeline ships it: uint8 images."""
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, 16, 16, 3)), jnp.uint8),
          "label": jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)}


def _images(n=16, seed=0):
  """_batch's images as the model sees them: x / 127.5 - 1."""
  return jnp.asarray(np.asarray(_batch(n, seed)["image"], np.float32) / 127.5 - 1.0)


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
  return optim.from_config(config, total_steps)[1]


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
    model = state_lib.build_model(config, NUM_CLASSES)
    tx = _tx(config)
    step_fn = steps.make_train_step(model, tx, config, NUM_CLASSES)
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


# The pre-training chain: clip (active: grad norm > 0.05) -> Adam -> decoupled wd, with
# the sigmoid loss and label smoothing.
ADAM = dict(optimizer="adam", learning_rate=1e-3, warmup_steps=0, lr_decay="linear",
            grad_clip_norm=0.05, weight_decay=0.1, loss="sigmoid", head_bias_init=-6.9,
            label_smoothing=0.1)
# Every train-time regulariser on, in bf16.
REGULARISED = dict(dtype="bfloat16", grad_accum_steps=2, mixup_alpha=0.5,
                   **{"model.stoch_depth": 0.1, "model.dropout": 0.1})


@pytest.mark.slow
def test_accumulated_micro_batches_give_the_large_batch_update():
  """k=4 micro-batches of 4 vs one batch of 16, through the recipe's whole chain
  (clipping, Adam, decoupled weight decay): the same parameters and optimiser state.
  The state holds Adam's first moment mu = 0.1 * clipped gradient, so the gradients
  themselves agree too (and with them the update of any optimiser, e.g. SGD)."""
  one = _config(grad_accum_steps=1, **ADAM)
  four = _config(grad_accum_steps=4, **ADAM)
  model = state_lib.build_model(one, NUM_CLASSES)
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
  model = state_lib.build_model(config, NUM_CLASSES)
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
      mutable=["intermediates"]), new_state["params"], _images())
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
  # (kernels="cpu", the default here: the stem's patch product has a custom VJP that
  # also writes the images' gradient, which XLA drops as unused).
  assert len(dots) == 6 + 6 + 6
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  for kind in ("softmax", "sigmoid"):  # bf16 logits in: a float32 loss out.
    loss = steps.loss_fn(jnp.zeros(logits.shape, jnp.bfloat16),
                         jax.nn.one_hot(_batch()["label"], NUM_CLASSES), kind)
    assert loss.dtype == jnp.float32


# ------------------------------------------------ stochastic depth and dropout
def test_config_wires_stochastic_depth_and_dropout_into_the_model():
  """The train model (what the train step applies) drops with every rng; the eval
  model (state.build_model(train=False), what the eval step applies) is deterministic."""
  # Two blocks: the first block's stochastic-depth rate is always 0.
  config = _config(**{"model.stoch_depth": 0.3, "model.dropout": 0.2, "model.num_blocks": 2})
  fields = state_lib.size_fields(config)
  model = state_lib.build_model(config, NUM_CLASSES, fields)
  assert (model.stoch_depth, model.dropout) == (0.3, 0.2)
  eval_model = state_lib.build_model(config, NUM_CLASSES, fields, train=False)
  assert (eval_model.stoch_depth, eval_model.dropout) == (0.0, 0.0)

  params = _state(model, _tx(config))["params"]
  images, labels = _images(), jax.nn.one_hot(_batch()["label"], NUM_CLASSES)
  # Stochastic depth alone (no dropout) must make the loss depend on the rng too.
  sd_model = state_lib.build_model(_config(**{"model.stoch_depth": 0.5, "model.num_blocks": 2}),
                               NUM_CLASSES, fields)

  def losses(key):
    loss = lambda m, train_: steps.loss_fn(m.apply({"params": params}, images, train=train_,
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


# ---------------------------------------------------------------- sigmoid loss
def test_sigmoid_loss_with_head_bias_init():
  config = _config(grad_accum_steps=1, **ADAM)
  model = state_lib.build_model(config, NUM_CLASSES)
  params = models.init_params(model, 16)
  batch = _batch()
  logits = model.apply({"params": params}, _images(), train=False)
  np.testing.assert_array_equal(logits, np.full(logits.shape, -6.9, np.float32))
  labels = jax.nn.one_hot(batch["label"], NUM_CLASSES)
  loss = float(steps.loss_fn(logits, labels, "sigmoid"))
  # Per example: softplus(6.9) for the true class + (K - 1) softplus(-6.9) for the rest.
  softplus = lambda v: math.log1p(math.exp(v))
  assert loss == pytest.approx(softplus(6.9) + (NUM_CLASSES - 1) * softplus(-6.9), rel=1e-5)
  _, metrics = _step(config)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])


# ------------------------------------------- uint8 batches, augmentation on device
def test_eval_step_on_uint8_images_is_the_model_on_x_over_127_5_minus_1():
  """The pipelines ship uint8; the eval step's scaling on the device is the former
  host scaling, so evaluation metrics are unchanged by the move."""
  config = _config()
  model = state_lib.build_model(config, NUM_CLASSES, train=False)
  params = _state(model, _tx(config))["params"]
  batch = dict(_batch(), mask=jnp.asarray([1.0] * 12 + [0.0] * 4))
  assert batch["image"].dtype == jnp.uint8
  sums = jax.jit(steps.make_eval_step(model, config, NUM_CLASSES))(params, batch)
  by_hand = np.asarray(batch["image"], np.float32) / 127.5 - 1.0
  logits = model.apply({"params": params}, jnp.asarray(by_hand), train=False)
  # Per example, masked as the step masks.
  per_example = np.asarray(jax.vmap(lambda l, y: steps.loss_fn(l[None], y[None], "softmax"))(
      logits, jax.nn.one_hot(batch["label"], NUM_CLASSES)))
  mask = np.asarray(batch["mask"])
  np.testing.assert_allclose(sums["loss"], np.sum(per_example * mask), rtol=1e-5)
  hits = np.asarray(jnp.argmax(logits, -1) == batch["label"])
  assert float(sums["accuracy"]) == float(np.sum(hits * mask))
  assert float(sums["num_examples"]) == 12


AUGMENT = dict(randaugment_on="device", train_flip=True, randaugment_layers=2,
               randaugment_magnitude=15)


def _augmented(images, seed=0, step=0, config=None):
  config = config or _config(seed=seed, **AUGMENT)
  key = jax.random.fold_in(jax.random.key(config.seed), step)  # As the train step's.
  augment = steps.augmenter(config)  # Outside the trace: it imports randaugment.
  return np.asarray(jax.jit(lambda x: augment(x, key))(images))


def test_device_augmentation_depends_only_on_seed_step_and_position():
  images = _batch()["image"]
  out = _augmented(images)
  # [-1, 1] up to a rounding: XLA divides by 127.5 as a multiply by its reciprocal.
  assert out.dtype == np.float32 and -1.0 <= out.min() and out.max() <= 1.0 + 1e-6
  # Each example is augmented (not the plain scaling), and differently from the others.
  plain = np.asarray(images, np.float32) / 127.5 - 1.0
  assert np.mean([not np.allclose(o, p) for o, p in zip(out, plain)]) > 0.5
  # Other rows changed: row 5's result is the same (its own image, seed, step, position).
  others = np.asarray(images).copy()
  others[np.arange(16) != 5] = 255 - others[np.arange(16) != 5]
  np.testing.assert_array_equal(_augmented(jnp.asarray(others))[5], out[5])
  # The same image at two positions, or at two steps, or under two seeds: other draws.
  same = jnp.broadcast_to(images[:1], images.shape)
  moved = _augmented(same)
  assert len({moved[i].tobytes() for i in range(16)}) > 8
  assert not np.array_equal(_augmented(images, step=1), out)
  assert not np.array_equal(_augmented(images, seed=1), out)
  # randaugment_on="host": the step only scales (the host augmented already).
  np.testing.assert_allclose(_augmented(images, config=_config(randaugment_on="host")),
                             plain, atol=1e-6, rtol=0)


_SHARDED = r"""
import sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
import test_steps
from mixer_jax import sharding, steps
mesh = sharding.make_mesh(1)
assert mesh.devices.size == 8, mesh
images = jax.device_put(test_steps._batch()["image"], sharding.batch_sharding(mesh))
config = test_steps._config(**test_steps.AUGMENT)
key = jax.random.fold_in(jax.random.key(config.seed), 0)
augment = steps.augmenter(config)
out = jax.jit(lambda x: augment(x, key))(images)
assert len(out.sharding.device_set) == 8
np.save(sys.argv[2], np.asarray(out))
"""


def test_device_augmentation_is_the_same_on_8_devices_as_on_1(tmp_path):
  """The batch sharded over 8 (forced host) devices: each example's augmentation is
  that of its global position, as on one device."""
  import os
  import subprocess
  import sys
  path = str(tmp_path / "sharded.npy")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", _SHARDED, os.path.dirname(__file__), path],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.load(path), _augmented(_batch()["image"]))
