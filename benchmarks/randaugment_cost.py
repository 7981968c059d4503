r"""Device RandAugment's cost beside the train step it feeds (issue 33 item 5).

  python benchmarks/randaugment_cost.py                      # B/16, batch 256, 224 px
  python benchmarks/randaugment_cost.py --time_variant=S/32 --time_batch=16
  python benchmarks/randaugment_cost.py --time_variant=B/16 --time_batch=256 --dtype=bfloat16  # GPU

FLOPs and bytes: XLA's cost analysis of the compiled programs, (a) flip + RandAugment
2/15 + uint8 -> [-1, 1] on a uint8 batch, (b) the train step as benchmark.TrainBench
builds it (state.Setup), both at --batch_size. RandAugment's layers run as a loop
(randaugment.apply_layers), whose body XLA's cost analysis counts once whatever the
trip count, so (a) is the program without RandAugment plus --layers times the cost of one
layer (the 1-layer program minus the 0-layer one); the 2-layer program's own count is
printed beside it ("augment_*_as_compiled"). CPU time: the median of --steps runs of
both at --time_batch with --time_variant (B/16 at batch 256 is too slow on a small CPU),
and the train images/s with RandAugment on the host (the step alone) and on the device
(the step, then the augmentation: inside the train step they run one after the other
too). The step computes in --dtype. Prints one JSON line.
"""

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import randaugment
from mixer_jax.tools import benchmark


def _cost(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _bench_args(variant, batch_size, image_size, dtype):
  """benchmark.py's own arguments (so its checks and defaults apply)."""
  return benchmark.parse_args([
      "--mode=train", f"--variant={variant}", f"--batch_size={batch_size}",
      f"--image_size={image_size}", f"--dtype={dtype}", "--kernels=xla",
      "--weight_decay=0", "--mixup_alpha=0", "--stoch_depth=0"])


def _augment(batch_size, image_size, num_layers, magnitude):
  key = jax.random.fold_in(jax.random.key(0), 1)
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (batch_size, image_size, image_size, 3), np.uint8))
  positions = jnp.arange(batch_size)
  fn = jax.jit(lambda x, p: randaugment.augment_batch(
      x, key, p, flip=True, num_layers=num_layers, magnitude=magnitude))
  return fn.lower(images, positions).compile(), (images, positions)


def _median_seconds(run, steps):
  """Median of `steps` timed calls after one untimed (compiling) call."""
  return statistics.median(benchmark.time_steps(run, 1, steps))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="B/16")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--time_variant", default="S/32")
  p.add_argument("--time_batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--magnitude", type=float, default=15)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  a = p.parse_args()

  base, one_layer, compiled = (
      _cost(_augment(a.batch_size, a.image_size, layers, a.magnitude)[0])
      for layers in (0, 1, a.layers))
  aug_flops, aug_bytes = (b + a.layers * (one - b) for b, one in zip(base, one_layer))
  train = benchmark.TrainBench(_bench_args(a.variant, a.batch_size, a.image_size, a.dtype))
  step_flops, step_bytes = _cost(train.compiled)
  del train

  augment_t, augment_inputs = _augment(a.time_batch, a.image_size, a.layers, a.magnitude)
  aug_s = _median_seconds(lambda: augment_t(*augment_inputs), a.steps)
  timed = benchmark.TrainBench(_bench_args(a.time_variant, a.time_batch, a.image_size,
                                                a.dtype))
  step_s = _median_seconds(timed.run, a.steps)
  print(json.dumps({
      "device": jax.devices()[0].device_kind, "cost_variant": a.variant,
      "cost_batch": a.batch_size, "image_size": a.image_size,
      "randaugment": f"{a.layers}/{a.magnitude:g} + flip + scaling",
      "augment_flops": aug_flops, "augment_bytes": aug_bytes,
      "augment_flops_as_compiled": compiled[0], "augment_bytes_as_compiled": compiled[1],
      "step_flops": step_flops, "step_bytes": step_bytes,
      "flops_fraction": aug_flops / step_flops, "bytes_fraction": aug_bytes / step_bytes,
      "dtype": a.dtype, "time_variant": a.time_variant, "time_batch": a.time_batch,
      "augment_s": aug_s, "step_s": step_s, "time_fraction": aug_s / step_s,
      "images_per_s_randaugment_on_host": a.time_batch / step_s,
      "images_per_s_randaugment_on_device": a.time_batch / (step_s + aug_s)}))


if __name__ == "__main__":
  main()
