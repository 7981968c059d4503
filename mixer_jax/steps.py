"""The pure train and eval step functions (state.py jits them with their shardings).

The `config` argument needs only attribute access to: seed, label_smoothing,
mixup_alpha, loss, grad_accum_steps, nonfinite.

The train step is a pure function of (state, batch): every random number derives
from (config.seed, step), so a resumed run is the same run.
"""

import jax
import jax.numpy as jnp
import optax

from mixer_jax import optim


# ----------------------------------------------------------------------- losses
def loss_fn(logits, labels, kind: str):
  """Mean over the batch of softmax CE, or of per-class-summed sigmoid BCE."""
  logits = logits.astype(jnp.float32)
  if kind == "softmax":
    return optax.softmax_cross_entropy(logits, labels).mean()
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()


def mixup(rng, images, labels, alpha: float):
  """Mixes each example with its neighbour in the batch, one Beta(a, a) weight per batch.

  Done on device inside the train step (not in tf.data): the pairing then spans the
  global batch and the weight derives from (seed, step) like every other random number.
  """
  lam = jax.random.beta(rng, alpha, alpha)
  mix = lambda x: lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)
  return mix(images), mix(labels)


# ------------------------------------------------------------------------ steps
def make_train_step(model, tx, config, num_classes: int):
  """(state, batch) -> (state, metrics). Pure; jit it with shardings."""
  base_key = jax.random.key(config.seed)

  def step_fn(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    mix_rng, drop_rng = jax.random.split(rng)
    images = batch["image"]
    labels = jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)
    if config.label_smoothing:
      labels = optax.smooth_labels(labels, config.label_smoothing)
    if config.mixup_alpha > 0:
      images, labels = mixup(mix_rng, images, labels, config.mixup_alpha)

    def grad_fn(params, micro, micro_rng):
      def compute_loss(p):
        logits = model.apply({"params": p}, micro["image"], train=True,
                             rngs={"dropout": micro_rng})
        loss = loss_fn(logits, micro["label"], config.loss)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(micro["label"], -1))
        return loss, accuracy
      return jax.value_and_grad(compute_loss, has_aux=True)(params)

    (loss, accuracy), grads = optim.accumulate_gradients(
        grad_fn, state["params"], {"image": images, "label": labels},
        config.grad_accum_steps, drop_rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
    if config.nonfinite == "skip":
      keep_old = lambda new, old: jnp.where(finite, new, old)
      new_state = {"step": step + 1,
                   "params": jax.tree_util.tree_map(keep_old, params, state["params"]),
                   "opt_state": jax.tree_util.tree_map(keep_old, opt_state, state["opt_state"])}
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    return new_state, metrics

  return step_fn


def make_eval_step(model, config, num_classes: int):
  """(params, batch) -> sums over the real (mask=1) examples of the batch."""
  def step_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"]
    labels = jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)
    if config.loss == "softmax":
      losses = optax.softmax_cross_entropy(logits, labels)
    else:
      losses = optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)
    top1 = jnp.argmax(logits, -1)
    sums = {"loss": jnp.sum(losses * mask),
            "accuracy": jnp.sum((top1 == batch["label"]) * mask),
            "num_examples": jnp.sum(mask)}
    if num_classes >= 5:
      _, top5 = jax.lax.top_k(logits, 5)
      sums["top5"] = jnp.sum(jnp.any(top5 == batch["label"][:, None], -1) * mask)
    if "real" in batch:
      # ReaL: only images with at least one real label count; correct if top-1 is any.
      has_real = (jnp.sum(batch["real"], -1) > 0) * mask
      hit = jnp.take_along_axis(batch["real"], top1[:, None], -1)[:, 0]
      sums["real_accuracy"] = jnp.sum(hit * has_real)
      sums["real_num_examples"] = jnp.sum(has_real)
    return sums
  return step_fn

