r"""Parameter table, total count and FLOPs per image of a model variant.

  python -m mixer_jax.tools.summary --variant=B/16
  python -m mixer_jax.tools.summary --variant=S/32 --image_size=224 --num_classes=1000
  python -m mixer_jax.tools.summary --variant=resmlp_12 --notable
  python -m mixer_jax.tools.summary --variant=gmlp_s16 --notable

Nothing is allocated: shapes come from `jax.eval_shape`, FLOPs from XLA's cost
analysis of the compiled forward pass for one image.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from mixer_jax import errors
from mixer_jax import models
from mixer_jax import weights

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("variant", "B/16", "Variant: a Mixer's (S/32, B/16, H/14, B/8, ...), "
                      "resmlp_12, resmlp_24, resmlp_36, resmlp_big_24, gmlp_ti16, gmlp_s16 "
                      "or gmlp_b16.")
  flags.DEFINE_integer("image_size", 224, "Square input side in pixels.")
  flags.DEFINE_integer("num_classes", 1000, "Head width (0: no head).")
  flags.DEFINE_bool("table", True, "Print the per-parameter table.")


def forward_flops(model, image_size: int) -> float:
  """XLA's FLOP count of one forward pass on one image (multiply-add = 2)."""
  params = models.param_shapes(model, image_size)
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, image).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def summarize(variant: str, image_size: int, num_classes: int):
  family, fields = models.preset(variant)
  model = models.create_model(family.name, num_classes, **fields)
  shapes = weights.flatten(models.param_shapes(model, image_size))
  rows = [(k, tuple(v.shape), int(v.size)) for k, v in shapes.items()]
  return model, rows


def main(argv):
  del argv
  try:
    model, rows = summarize(FLAGS.variant, FLAGS.image_size, FLAGS.num_classes)
  except ValueError as e:
    raise errors.usage(str(e))
  total = sum(n for _, _, n in rows)
  if FLAGS.table:
    width = max(len(k) for k, _, _ in rows)
    for key, shape, n in rows:
      print(f"{key:<{width}}  {str(shape):<16} {n:>12,}")
  flops = forward_flops(model, FLAGS.image_size)
  name = FLAGS.variant if "/" not in FLAGS.variant else f"Mixer-{FLAGS.variant}"
  print(f"{name} at {FLAGS.image_size}px, {FLAGS.num_classes} classes: "
        f"{total:,} parameters, {flops / 1e9:.2f} GFLOPs per image (forward).")
  print(json.dumps({"variant": FLAGS.variant, "image_size": FLAGS.image_size,
                    "num_classes": FLAGS.num_classes, "params": total,
                    "forward_flops": flops}))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
