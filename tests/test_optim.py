"""optim.py: the learning-rate schedules, the optax chains (clip -> Adam or momentum
SGD -> decoupled weight decay on kernels only -> learning rate) and gradient
accumulation over micro-batches; on small hand-made trees, no model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mixer_jax import errors
from mixer_jax import optim
from mixer_jax import state


# -------------------------------------------------------------------- schedules
def test_linear_warmup_then_linear_decay_to_the_end_rate():
  s = optim.learning_rate_schedule(1.0, 10, 2, "linear", end_lr=0.1)
  np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 6, 10)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_cosine_and_constant_after_warmup():
  cosine = optim.learning_rate_schedule(2.0, 12, 2, "cosine")
  np.testing.assert_allclose([float(cosine(i)) for i in (1, 2, 7, 12)],
                             [1.0, 2.0, 1.0, 0.0], atol=1e-6)
  constant = optim.learning_rate_schedule(0.3, 10, 4, "constant")
  np.testing.assert_allclose([float(constant(i)) for i in (2, 4, 9)], [0.15, 0.3, 0.3],
                             atol=1e-6)


def test_no_warmup_starts_at_the_base_rate_and_warmup_is_capped_at_the_run():
  assert float(optim.learning_rate_schedule(0.5, 4, 0, "linear")(0)) == pytest.approx(0.5)
  capped = optim.learning_rate_schedule(1.0, 4, 100, "linear")
  assert float(capped(2)) == pytest.approx(0.5) and float(capped(4)) == pytest.approx(1.0)


def test_unknown_schedule_and_optimizer_are_named():
  # Checked once, in state.validate_config; optim trusts its inputs.
  for key, value, allowed in (("lr_decay", "step", "linear, cosine, constant"),
                              ("optimizer", "lars", "adam, sgd, lamb")):
    config = common.base_config()
    config[key] = value
    with pytest.raises(errors.ConfigError,
                       match=f"config.{key}='{value}' is not one of {allowed}."):
      state.validate_config(config)


# ------------------------------------------------------------------- the chains
PARAMS = {"Dense_0": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)},
          "LayerNorm_0": {"scale": jnp.ones((3,))}}


def _first_update(grads, **kwargs):
  tx = optim.make_optimizer(schedule=optax.constant_schedule(0.1), **kwargs)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_weight_decay_reaches_kernels_only_and_scales_with_the_rate():
  assert optim.kernel_mask(PARAMS) == {"Dense_0": {"kernel": True, "bias": False},
                                       "LayerNorm_0": {"scale": False}}
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  updates = _first_update(zeros, name="sgd", weight_decay=0.5, grad_clip_norm=0.0)
  # Decoupled (AdamW style): -lr * wd * kernel, nothing for biases or LayerNorm.
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * 0.5 * 2.0)
  np.testing.assert_array_equal(updates["Dense_0"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["LayerNorm_0"]["scale"], 0.0)


def test_lamb_scales_each_update_by_its_trust_ratio():
  """Zero gradients: the update is the decayed kernel wd * w, rescaled by ||w|| / ||wd w||
  to the kernel's own norm, times -lr; biases and scales (not decayed) stay."""
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  updates = _first_update(zeros, name="lamb", weight_decay=0.05, grad_clip_norm=1.0)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["Dense_0"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["LayerNorm_0"]["scale"], 0.0)


def test_gradients_are_clipped_by_global_norm_before_the_optimizer():
  grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 3.0), PARAMS)  # 12 entries.
  sgd = _first_update(grads, name="sgd", grad_clip_norm=1.0)
  np.testing.assert_allclose(optax.tree.norm(sgd), 0.1 * 1.0, rtol=1e-6)
  unclipped = _first_update(grads, name="sgd", grad_clip_norm=0.0)
  np.testing.assert_allclose(optax.tree.norm(unclipped), 0.1 * 3.0 * np.sqrt(12), rtol=1e-6)
  # Adam's first step is about -lr * sign(g) for every entry, clipped or not.
  adam = _first_update(grads, name="adam", grad_clip_norm=1.0)
  for leaf in jax.tree_util.tree_leaves(adam):
    np.testing.assert_allclose(leaf, -0.1, rtol=1e-4)


def test_momentum_sgd_carries_the_previous_gradient():
  tx = optim.make_optimizer(name="sgd", schedule=optax.constant_schedule(1.0), momentum=0.9,
                            grad_clip_norm=0.0)
  g = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  state = tx.init(PARAMS)
  _, state = tx.update(g, state, PARAMS)
  second, _ = tx.update(g, state, PARAMS)
  for leaf in jax.tree_util.tree_leaves(second):
    np.testing.assert_allclose(leaf, -1.9, rtol=1e-6)


def test_from_config_reads_the_config_keys():
  c = common.base_config()
  c.learning_rate, c.warmup_steps, c.lr_decay, c.end_learning_rate = 0.2, 2, "linear", 0.0
  schedule, tx = optim.from_config(c, 6)
  np.testing.assert_allclose([float(schedule(i)) for i in (1, 2, 4, 6)], [0.1, 0.2, 0.1, 0.0],
                             atol=1e-7)
  assert isinstance(tx, optax.GradientTransformation)


# -------------------------------------------------------- gradient accumulation
def test_accumulated_micro_batches_average_to_the_full_batch_and_fold_the_rng():
  x = jnp.arange(8.0)

  def grad_fn(params, micro, rng):
    loss = jnp.mean((params["w"] * micro - 1.0) ** 2)
    grads = {"w": jnp.mean(2 * (params["w"] * micro - 1.0) * micro)}
    return (loss, jnp.max(micro)), grads

  params = {"w": jnp.asarray(0.5)}
  full = grad_fn(params, x, jax.random.key(0))
  (loss, aux), grads = optim.accumulate_gradients(grad_fn, params, x, 4, jax.random.key(0))
  np.testing.assert_allclose(loss, full[0][0], rtol=1e-6)
  np.testing.assert_allclose(grads["w"], full[1]["w"], rtol=1e-6)
  # Micro-batch i takes rows i, i + k, ...: the aux (max row) is the mean of 4..7.
  np.testing.assert_allclose(aux, np.mean([4.0, 5.0, 6.0, 7.0]))
  # One micro-batch: the plain call, with the rng as given.
  assert optim.accumulate_gradients(grad_fn, params, x, 1, jax.random.key(0))[0][0] == full[0][0]

  def rng_fn(params, micro, rng):
    return (jax.random.uniform(rng), jnp.zeros(())), {"w": jnp.zeros(())}
  (mean_draw, _), _ = optim.accumulate_gradients(rng_fn, params, x, 4, jax.random.key(3))
  draws = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(3), i))) for i in range(4)]
  np.testing.assert_allclose(mean_draw, np.mean(draws), rtol=1e-6)
