r"""Where the host's time goes in the paper's ImageNet-1k input, one stage at a time.

  python benchmarks/input_stages.py              # 256 generated 500x375 JPEGs, 224 px

Each row is a tf.data pipeline on ONE thread over the JPEGs that `tools.benchmark
--mode=input` reads (benchmark.InMemoryJpegs), with the pipeline's own functions
(augment.decode_and_inception_crop, decode.resize, augment.random_flip,
augment.randaugment), each row one more stage than the row above it:

  decode            the whole JPEG (for scale: the crop decodes less of it)
  decode in crop    the Inception crop's window only (augment.decode_and_inception_crop)
  + resize          + the antialiased bilinear resize to 224 (decode.resize): the
                    host's whole part when the train step augments ("device")
  + resize, no AA   the same without antialiasing (other pixels: for scale only)
  + flip + RA 2/15  + flip and RandAugment 2/15: the host's part with "host"
  + float32         + the [-1, 1] scaling: the former path (float32 shipped)

Rates are the best of --rounds windows of --images images, rows alternating round by
round (a slow spell of a shared machine falls on every row). The last column is the
row's rate over the former path's. Prints a table and one JSON line.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from mixer_jax import augment  # pylint: disable=g-import-not-at-top
from mixer_jax import input_pipeline
from mixer_jax.datasets import decode
from mixer_jax.tools import benchmark

SIZE = 224
BATCH = 32


def _stages(image_size):
  """name -> fn(encoded, seed) -> image, each the row above plus one stage."""
  crop = augment.decode_and_inception_crop
  resized = lambda e, s: decode.resize(crop(e, s), image_size)

  def augmented(e, s):
    image = augment.random_flip(resized(e, s), s)
    return augment.randaugment(image, s, num_layers=2, magnitude=15)

  def no_antialias(e, s):
    image = tf.image.resize(crop(e, s), (image_size, image_size), antialias=False)
    return tf.cast(tf.round(image), tf.uint8)

  return {
      "decode": lambda e, s: tf.image.decode_jpeg(e, channels=3),
      "decode in crop": crop,
      "+ resize": resized,
      "+ resize, no AA": no_antialias,
      "+ flip + RA 2/15": augmented,
      "+ float32": lambda e, s: input_pipeline._to_model_range(augmented(e, s)),  # pylint: disable=protected-access
  }


def _one_thread(dataset):
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return dataset.with_options(options)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_source_images", type=int, default=256)
  p.add_argument("--images", type=int, default=512, help="Images per timed window.")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--image_size", type=int, default=SIZE)
  args = p.parse_args()
  tf.config.set_visible_devices([], "GPU")
  source = benchmark.InMemoryJpegs(args.num_source_images, 1000)
  encoded = tf.constant(source.encoded)
  iterators = {}
  for name, fn in _stages(args.image_size).items():
    seeds = tf.data.Dataset.range(1 << 40).map(lambda i: tf.stack([i, i]))
    jpegs = tf.data.Dataset.from_tensor_slices(encoded).repeat()
    if name in ("decode", "decode in crop"):  # Sizes vary: keep the shape (the decode runs).
      fn = lambda e, s, fn=fn: tf.shape(fn(e, s))
    ds = tf.data.Dataset.zip(jpegs, seeds).map(fn, num_parallel_calls=1)
    # In batches, as the pipeline ships them: the per-element Python cost is not timed.
    iterators[name] = iter(_one_thread(ds.batch(BATCH)))
  rates = {name: 0.0 for name in iterators}
  for _ in range(args.rounds):
    for name, it in iterators.items():
      n = max(args.images // BATCH, 1)
      next(it)
      start = time.perf_counter()
      for _ in range(n):
        next(it)
      rates[name] = max(rates[name], n * BATCH / (time.perf_counter() - start))
  former = rates["+ float32"]
  print(f"{'stage':20s} {'img/s (1 thread)':>17s} {'ms/img':>7s} {'vs former path':>15s}")
  for name, rate in rates.items():
    print(f"{name:20s} {rate:17.1f} {1e3 / rate:7.2f} {rate / former:14.2f}x")
  print(json.dumps({"images_per_s_one_thread": rates, "mean_jpeg_bytes": source.mean_jpeg_bytes,
                    "image_size": args.image_size,
                    "device": benchmark.device_description(with_jax=False)}))


if __name__ == "__main__":
  main()
