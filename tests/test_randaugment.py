"""Device RandAugment (mixer_jax/randaugment.py) against its host twin (augment.py).

Same images, same ops, same arguments: the device op and the tf.data op give the same
uint8 pixels. Every op, and the whole RandAugment, is bit-exact on CPU: the device rounds
each product before an addition as TensorFlow does (see randaugment._product), its grey
levels use the host's left-to-right sum, and the ops' arguments are computed on the host
in float32. The bounds below are therefore 0. Few compiles: each jitted function is
called with one shape only.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mixer_jax import augment, randaugment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, W = 16, 28, 36  # Not square: height and width must not be swapped.
MAGNITUDES = (0, 5, 15, 30)

# Max |device - host| in uint8 levels per op. 0 for all: colour ops are tables or
# blends with the host's float32 arithmetic, and the affine ops are the host's warp
# (ImageProjectiveTransformV3's output -> input map and bilinear weights) in float32.
MAX_DIFFERENCE = {name: 0 for name in randaugment.OP_NAMES}
MEAN_DIFFERENCE = {name: 0.0 for name in randaugment.OP_NAMES}


def _images(seed=0, batch=B):
  """Photo-like images (smooth colour fields plus noise) and one of pure noise."""
  rng = np.random.default_rng(seed)
  fields = tf.image.resize(rng.integers(0, 256, (batch, 4, 4, 3)).astype(np.float32),
                           (H, W)).numpy()
  images = np.clip(fields + rng.normal(0, 20, fields.shape), 0, 255).astype(np.uint8)
  images[0] = rng.integers(0, 256, (H, W, 3))
  images[1] = 77  # A constant image: auto_contrast and equalize leave it as it is.
  return images


def _host_op(monkeypatch, name, image, magnitude, sign):
  """augment.OPS[name] with its random sign forced to `sign`, called eagerly."""
  monkeypatch.setattr(augment, "_random_sign", lambda seed: tf.constant(sign, tf.float32))
  return augment.OPS[name](tf.constant(image), magnitude, tf.constant([0, 0])).numpy()


def test_op_names_are_the_hosts_in_order():
  assert randaugment.OP_NAMES == tuple(augment.OPS)
  assert randaugment.MAX_MAGNITUDE == augment.MAX_MAGNITUDE
  assert randaugment.FILL_VALUE == augment.FILL_VALUE


def test_each_op_equals_the_host_op(monkeypatch):
  images = _images()
  apply = randaugment._apply_batch  # One compile for every op.
  failures = []
  for name in randaugment.OP_NAMES:
    index = randaugment.OP_NAMES.index(name)
    for magnitude in MAGNITUDES:
      for sign in (1.0, -1.0):
        arg = randaugment.op_arguments(magnitude, sign, H, W)[index]
        device = np.asarray(apply(jnp.asarray(images), jnp.full((B,), index),
                                  jnp.full((B,), arg)))
        host = np.stack([_host_op(monkeypatch, name, im, magnitude, sign) for im in images])
        diff = np.abs(device.astype(int) - host.astype(int))
        if diff.max() > MAX_DIFFERENCE[name] or diff.mean() > MEAN_DIFFERENCE[name]:
          failures.append(f"{name} m={magnitude} sign={sign}: mean {diff.mean():.4f} "
                          f"max {diff.max()}")
  assert not failures, failures


def test_apply_op_takes_the_host_ops_argument():
  images = _images()  # The per-op test's shape: no new compile.
  cases = {"rotate": (augment.rotate, 12.5), "posterize": (augment.posterize, 3),
           "translate_y": (augment.translate_y, -7.3), "contrast": (augment.contrast, 1.7)}
  for name, (host_fn, arg) in cases.items():
    device = np.asarray(randaugment.apply_op(name, jnp.asarray(images), arg))
    host = np.stack([host_fn(tf.constant(im), arg).numpy() for im in images])
    np.testing.assert_array_equal(device, host, err_msg=name)


# One compile shared by the tests below (same shapes; key and positions are arguments).
_RANDAUGMENT = jax.jit(randaugment.randaugment, static_argnums=(3, 4))


def test_randaugment_equals_the_host_on_the_same_drawn_ops(monkeypatch):
  images = _images(seed=1)
  key = jax.random.fold_in(jax.random.key(3), 7)
  num_layers, magnitude = 2, 15
  indices, signs = randaugment.draw(key, np.arange(B), num_layers)
  device = np.asarray(_RANDAUGMENT(jnp.asarray(images), key, np.arange(B), num_layers,
                                   magnitude))
  host = []
  for image, ops, layer_signs in zip(images, np.asarray(indices), np.asarray(signs)):
    for index, sign in zip(ops, layer_signs):
      image = _host_op(monkeypatch, randaugment.OP_NAMES[index], image, magnitude, sign)
    host.append(image)
  # Exact: the arguments come from the host-side float32 table (randaugment.op_arguments),
  # so XLA cannot fold the constant magnitude into them.
  np.testing.assert_array_equal(device, np.stack(host))
  # The draw covers most ops and both signs (a fixed key: not a flaky statistic).
  assert len(set(np.asarray(indices).ravel())) >= 10 and set(np.asarray(signs).ravel()) == {-1, 1}


def test_an_example_depends_only_on_seed_step_and_position():
  images = jnp.asarray(_images(seed=2))
  positions = np.arange(100, 100 + B)
  key = jax.random.fold_in(jax.random.key(0), 5)
  # The train step's entry point: flip, RandAugment 2/15, scaling (one compile).
  run = jax.jit(lambda x, k, p: randaugment.augment_batch(x, k, p, flip=True, num_layers=2))
  whole = np.asarray(run(images, key, positions))
  flipped = randaugment.random_flip(images, jax.random.fold_in(key, 0), positions)
  augmented = _RANDAUGMENT(flipped, jax.random.fold_in(key, 1), positions, 2, 15)
  np.testing.assert_array_equal(whole, np.asarray(jax.jit(randaugment.to_model_range)(augmented)))
  # The same examples in another order (another place in the batch, same positions).
  order = np.random.default_rng(0).permutation(B)
  np.testing.assert_array_equal(whole[order], np.asarray(run(images[order], key, positions[order])))
  # Another step draws other ops.
  other = jax.random.fold_in(jax.random.key(0), 6)
  assert not np.array_equal(whole, np.asarray(run(images, other, positions)))


_SHARDED = r"""
import hashlib, json
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mixer_jax import randaugment
images = np.random.default_rng(0).integers(0, 256, (16, %d, %d, 3)).astype(np.uint8)
key = jax.random.fold_in(jax.random.key(4), 9)
run = jax.jit(randaugment.randaugment, static_argnums=(3, 4))
batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
sharded = run(jax.device_put(images, batch), key, jax.device_put(np.arange(16), batch), 2, 15)
print("RESULT " + json.dumps({"devices": jax.device_count(),
      "shards": len(sharded.addressable_shards),
      "sha256": hashlib.sha256(np.asarray(sharded).tobytes()).hexdigest()}))
"""


def test_a_sharded_batch_gives_the_same_bits_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED % (H, W)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])
  # The same batch on this process's one device (the shared compile).
  images = np.random.default_rng(0).integers(0, 256, (B, H, W, 3)).astype(np.uint8)
  single = _RANDAUGMENT(jnp.asarray(images), jax.random.fold_in(jax.random.key(4), 9),
                        np.arange(B), 2, 15)
  assert out == {"devices": 8, "shards": 8,
                 "sha256": hashlib.sha256(np.asarray(single).tobytes()).hexdigest()}


def test_flip_and_scaling_match_the_host():
  images = _images()[:4]
  flipped = np.asarray(randaugment.random_flip(jnp.asarray(images), jax.random.key(0),
                                               np.arange(4)))
  for image, out in zip(images, flipped):
    assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
  # XLA divides by 127.5 as a multiply by its reciprocal: within a float32 rounding.
  np.testing.assert_allclose(
      np.asarray(jax.jit(randaugment.to_model_range)(jnp.asarray(images))),
      (tf.cast(images, tf.float32) / 127.5 - 1.0).numpy(), rtol=0, atol=2.0**-23)
