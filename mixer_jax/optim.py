"""The optax chains and learning-rate schedules of the paper, from plain arguments.

Pre-training (paper Section 3, Table 4): clip by global norm 1 -> Adam(0.9, 0.999) ->
decoupled weight decay on kernels only (multiplied by the learning rate, AdamW
style: "0.1" in Table 4 is this coefficient) -> linear warmup then linear decay.
Fine-tuning (Appendix B): clip 1 -> momentum SGD 0.9 -> cosine with linear warmup,
no weight decay.
ResMLP (arXiv 2105.03404) trains with LAMB (You et al. 2019, arXiv 1904.00962):
clip (if any) -> optax.lamb, i.e. Adam's direction plus decoupled weight decay on
kernels, each parameter's update rescaled by the trust ratio ||w|| / ||update||, then
the learning rate.
"""

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adam", "sgd", "lamb")


def learning_rate_schedule(base_lr: float, total_steps: int, warmup_steps: int,
                           decay: str = "linear", end_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr`, then `decay` (one of SCHEDULES, as
  state.validate_config checks) down to `end_lr` at `total_steps`."""
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, base_lr, max(warmup_steps, 1))
  if decay == "linear":
    after = optax.linear_schedule(base_lr, end_lr, decay_steps)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_lr / base_lr if base_lr else 0.0)
  else:
    after = optax.constant_schedule(base_lr)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def kernel_mask(params):
  """True for Dense/Conv kernels: only they are weight-decayed (not biases, LN)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(*, name: str, schedule: optax.Schedule, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, momentum: float = 0.9,
                   weight_decay: float = 0.0,
                   grad_clip_norm: float = 1.0) -> optax.GradientTransformation:
  """`name` is one of OPTIMIZERS (state.validate_config checks it)."""
  chain = []
  if grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  if name == "lamb":  # Its own weight decay (kernels only) and learning rate.
    chain.append(optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                            mask=kernel_mask))
    return optax.chain(*chain)
  if name == "adam":
    chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  else:  # sgd
    chain.append(optax.trace(decay=momentum, nesterov=False))
  if weight_decay > 0:
    chain.append(optax.add_decayed_weights(weight_decay, mask=kernel_mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain)


def accumulate_gradients(grad_fn, params, batch, num_micro: int, rng):
  """Mean loss/grads over `num_micro` equal micro-batches, one at a time (lax.scan).

  The mean of equal-size micro-batch means is the full-batch mean, so k accumulated
  micro-batches give the update of one batch k times larger; only one micro-batch of
  activations is alive at a time. `grad_fn(params, micro_batch, rng) -> ((loss, aux),
  grads)`; the rng is folded with the micro-batch index.
  """
  if num_micro == 1:
    return grad_fn(params, batch, rng)

  def split(x):
    # Micro-batch i takes rows i, i+k, i+2k, ...: each micro-batch then spans every
    # device of the data-sharded batch instead of living on a few of them.
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro_batches = jax.tree_util.tree_map(split, batch)

  def body(carry, inputs):
    i, micro = inputs
    (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
    carry = jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads))
    return carry, None

  first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
  shapes = jax.eval_shape(lambda p, b: grad_fn(p, b, rng), params, first)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 (shapes[0][0], shapes[0][1], shapes[1]))
  (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro_batches))
  mean = lambda x: x / num_micro
  return (mean(loss), jax.tree_util.tree_map(mean, aux)), jax.tree_util.tree_map(mean, grads)


def from_config(config, total_steps: int):
  """(learning-rate schedule, optax chain) from the config's optimiser keys."""
  schedule = learning_rate_schedule(config.learning_rate, total_steps, config.warmup_steps,
                                    config.lr_decay, config.end_learning_rate)
  tx = make_optimizer(name=config.optimizer, schedule=schedule, b1=config.b1, b2=config.b2,
                      eps=config.eps, momentum=config.momentum,
                      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm)
  return schedule, tx
