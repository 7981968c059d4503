"""The pure train and eval step functions (state.py jits them with their shardings).

The `config` argument needs only attribute access to: seed, label_smoothing,
mixup_alpha, loss, grad_accum_steps, nonfinite (and cutmix_alpha, 0 where absent;
randaugment_on, "host" where absent, with train_flip, randaugment_layers and
randaugment_magnitude where it is "device").

Batches arrive as the input pipeline makes them: uint8 images. Both steps scale them to
[-1, 1] here, on the device (a quarter of the bytes of float32 cross the host link);
with randaugment_on="device" the train step first flips and RandAugments them
(randaugment.py).

The train step is a pure function of (state, batch): every random number derives
from (config.seed, step), so a resumed run is the same run.
"""

import jax
import jax.numpy as jnp
import optax

from mixer_jax import optim
from mixer_jax import randaugment

# Where flip and RandAugment run (config.randaugment_on); "auto" resolves by backend.
RANDAUGMENT_ON = ("auto", "host", "device")
# Folded into the step's key for the augmentation's stream: independent of the
# mixup and dropout keys that split the same step key.
_AUGMENT_STREAM = 0x5241  # "RA"


def randaugment_on(config) -> str:
  """config.randaugment_on resolved: "device" or "host" ("auto": "device" where JAX's
  backend is an accelerator, "host" on CPUs)."""
  place = getattr(config, "randaugment_on", "host")
  if place == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return place


to_model_range = randaugment.to_model_range  # uint8 -> float32 in [-1, 1], x / 127.5 - 1.


def augmenter(config):
  """(uint8 images, step key) -> float32 in [-1, 1], for the train step: with
  randaugment_on="device" flipped and RandAugmented first, each example keyed by its
  place in the global batch (the whole batch: grad_accum_steps splits it afterwards),
  so the result depends only on (seed, step, position), whatever the topology."""
  if randaugment_on(config) != "device":
    return lambda images, key: to_model_range(images)

  def augment(images, key):
    positions = jnp.arange(images.shape[0])
    return randaugment.augment_batch(
        images, jax.random.fold_in(key, _AUGMENT_STREAM), positions,
        flip=config.train_flip, num_layers=config.randaugment_layers,
        magnitude=config.randaugment_magnitude)
  return augment


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


def cutmix(rng, images, labels, alpha: float):
  """CutMix (Yun et al. 2019, arXiv 1905.04899): each example gets a box pasted from its
  neighbour in the batch; one box per batch, its area 1 - lam for lam ~ Beta(a, a),
  centred uniformly and clipped at the borders (timm's rand_bbox), and the labels
  mixed by the area actually kept. On device, like `mixup`."""
  lam_rng, row_rng, col_rng = jax.random.split(rng, 3)
  h, w = images.shape[1:3]
  cut = jnp.sqrt(1.0 - jax.random.beta(lam_rng, alpha, alpha))
  cut_h, cut_w = (jnp.floor(h * cut).astype(jnp.int32), jnp.floor(w * cut).astype(jnp.int32))
  cy, cx = jax.random.randint(row_rng, (), 0, h), jax.random.randint(col_rng, (), 0, w)
  rows, cols = jnp.arange(h), jnp.arange(w)
  in_rows = (rows >= jnp.clip(cy - cut_h // 2, 0, h)) & (rows < jnp.clip(cy + cut_h // 2, 0, h))
  in_cols = (cols >= jnp.clip(cx - cut_w // 2, 0, w)) & (cols < jnp.clip(cx + cut_w // 2, 0, w))
  box = in_rows[:, None] & in_cols[None, :]
  lam = 1.0 - jnp.mean(box.astype(jnp.float32))
  images = jnp.where(box[None, :, :, None], jnp.roll(images, 1, axis=0), images)
  return images, lam * labels + (1.0 - lam) * jnp.roll(labels, 1, axis=0)


def mix_batch(rng, images, labels, mixup_alpha: float, cutmix_alpha: float):
  """Mixup, CutMix, or with both on (the DeiT recipe) one of the two per batch with
  probability 1/2 each (timm's Mixup, switch_prob 0.5)."""
  if not cutmix_alpha:
    return mixup(rng, images, labels, mixup_alpha)
  if not mixup_alpha:
    return cutmix(rng, images, labels, cutmix_alpha)
  pick, mix_rng = jax.random.split(rng)
  use_cutmix = jax.random.bernoulli(pick, 0.5)
  return jax.lax.cond(use_cutmix, lambda: cutmix(mix_rng, images, labels, cutmix_alpha),
                      lambda: mixup(mix_rng, images, labels, mixup_alpha))


# ------------------------------------------------------------------------ steps
def make_train_step(model, tx, config, num_classes: int):
  """(state, batch) -> (state, metrics). Pure; jit it with shardings."""
  base_key = jax.random.key(config.seed)
  prepare_images = augmenter(config)

  def step_fn(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    mix_rng, drop_rng = jax.random.split(rng)
    images = prepare_images(batch["image"], rng)
    labels = jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)
    if config.label_smoothing:
      labels = optax.smooth_labels(labels, config.label_smoothing)
    cutmix_alpha = getattr(config, "cutmix_alpha", 0.0)
    if config.mixup_alpha > 0 or cutmix_alpha > 0:
      images, labels = mix_batch(mix_rng, images, labels, config.mixup_alpha, cutmix_alpha)

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


def make_eval_step(model, config, num_classes: int, confusion: bool = False):
  """(params, batch) -> sums over the real (mask=1) examples of the batch (uint8 images).

  With `confusion`, also `confusion[i, j]`: how many examples of class i were
  predicted as class j."""
  def step_fn(params, batch):
    logits = model.apply({"params": params}, to_model_range(batch["image"]), train=False)
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
    if confusion:
      predicted = jax.nn.one_hot(top1, num_classes, dtype=jnp.float32)
      sums["confusion"] = (labels * mask[:, None]).T @ predicted
    return sums
  return step_fn

