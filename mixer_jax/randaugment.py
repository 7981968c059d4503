"""RandAugment on the device: the tf.data RandAugment of `augment.py`, batched in JAX.

The same 15 operations, in the same order (`OP_NAMES` is `augment.OPS`'s keys), with the
same magnitude -> argument map and the same pixel arithmetic as the host ops, so an image
given the same ops and arguments comes out the same, bit for bit on CPU, op by op and
for the whole RandAugment (tests/test_randaugment.py). Images are uint8 `(B, H, W, 3)`; every op returns uint8,
rounding as the host does between layers.

Randomness: example i of a batch draws its ops and signs from
`fold_in(key, positions[i])`, where `key` is `fold_in(key(seed), step)` and `positions`
holds the examples' places in the GLOBAL batch. An example's result therefore depends
only on (seed, step, position), whichever device or host computes it.

How the batch runs: no per-example control flow and no float32 candidate images. Each
layer is two stages over the whole batch, every example picking its own parameters, and
a stage is the exact identity for examples whose op is of another kind:
  - colour (`_colour_one` under vmap): a per-channel 256-entry uint8 table, then a blend
    with a degenerate image. Table ops (identity, auto_contrast, equalize, solarize,
    posterize, contrast, brightness, solarize_add) build their table from the image's
    statistics (`Stats`: its rounded luma and per-channel histogram, computed once per
    layer); the others get the identity table. Blend ops (color, sharpness) blend with
    grey or PIL's smoothed image at their factor; the others get factor 1, which gives
    back the uint8 image exactly.
  - warp (`_warp`, batched): ImageProjectiveTransformV3's bilinear output -> input map
    with each example's transform (rotate, shear_x/y, translate_x/y), the identity
    transform for the others (weights 1 and 0: exact). Grey fill outside, neighbours
    outside read as grey, as TF's.
Layers run as a `lax.scan`, so each layer's uint8 output is written once (unrolled, XLA
fuses one layer's warp into the next layer's many reads of it and recomputes it there).

Arguments (`op_arguments`) are computed on the host in numpy float32, in the host's order:
inside the jitted program XLA folds the constant magnitude into the products and lands
some factors one float32 step off, which moved blends by a level.

Written here rather than taken from dm-pix: its contrast is TF's (per-channel mean) not
PIL's (grey-level mean) that the host uses, its grey is not rounded as PIL's, its
sharpness filter and its `affine_transform` (scipy's map_coordinates) differ in the
border handling and pixel-centre convention, so matching the host would need the same
code around it; each op here is a few lines of jnp.
"""

import math
from typing import NamedTuple, Tuple

import jax
import numpy as np
import jax.numpy as jnp

MAX_MAGNITUDE = 30.0
FILL_VALUE = 128.0

# Same order as augment.OPS: an op's index is its place here.
OP_NAMES = ("identity", "auto_contrast", "equalize", "rotate", "solarize", "color",
            "posterize", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
            "translate_x", "translate_y", "solarize_add")
TABLE_OPS = ("identity", "auto_contrast", "equalize", "solarize", "posterize",
             "contrast", "brightness", "solarize_add")
BLEND_OPS = ("color", "sharpness")
AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

# PIL's ITU-R 601-2 luma weights, as augment._LUMA.
_LUMA = (0.299, 0.587, 0.114)
_LEVELS = np.arange(256, dtype=np.float32)
# Each float32 weight as an integer mantissa (24 bits) times a power of two.
_LUMA_MANTISSAS = [(int(np.ldexp(m, 24)), np.ldexp(1.0, e - 24))
                   for m, e in map(np.frexp, np.asarray(_LUMA, np.float32))]


def _product(a, b):
  """a * b rounded to float32 before any later addition, as the host rounds it.

  XLA contracts `c + a * b` into one fused multiply-add (one rounding), which lands a
  blend such as 127 + 1.45 * (57 - 127) = 25.5 on 25 where the host gets 26. A select
  between the product and the addition stops the contraction (an optimization
  barrier or a bitcast round trip do not: XLA removes them); the products are finite,
  so the select always keeps them.
  """
  product = a * b
  return jnp.where(jnp.isnan(product), 0.0, product)


def _to_uint8(x):
  return jnp.clip(jnp.round(x), 0.0, 255.0).astype(jnp.uint8)


def _grayscale(images):
  """Rounded luma of uint8 RGB images (..., H, W, 3) as uint8 (..., H, W, 1), as
  augment._grayscale.

  TensorFlow's tensordot sums the three float32-rounded products left to right (checked
  on all 2**24 colours); a dot, or XLA's fused multiply-adds, differ on ~1,400 colours
  whose luma is within a rounding of .5. So each product is made in integers, where
  nothing can contract it: level * weight = (level * mantissa) * 2**exponent, the
  integer product (< 2**32) rounded to float32 by the conversion, then scaled exactly.
  """
  x = images.astype(jnp.uint32)
  r, g, b = ((x[..., c] * np.uint32(m)).astype(jnp.float32) * np.float32(scale)
             for c, (m, scale) in enumerate(_LUMA_MANTISSAS))
  return jnp.round((r + g) + b).astype(jnp.uint8)[..., None]


# ------------------------------------------------------------------ arguments
def op_arguments(magnitude, sign, height, width) -> np.ndarray:
  """Every op's argument at `magnitude` with random sign `sign` (+1/-1): a (15,) array.

  The lambdas of augment.OPS, operation for operation, in numpy float32 on the host:
  each product and sum rounded once, as TensorFlow does. Computed in the jitted program
  instead, XLA folds the constant magnitude into the products and a factor such as
  1 - 0.9 * 0.5 lands one float32 step away from the host's, which moves blends by a level.
  """
  f32 = np.float32
  sign = f32(sign)
  level = f32(np.clip(f32(magnitude), f32(0.0), f32(MAX_MAGNITUDE))) / f32(MAX_MAGNITUDE)
  factor = f32(1.0) + sign * f32(0.9) * level
  args = {
      "rotate": sign * f32(30.0) * level,
      "solarize": f32(256.0) - f32(256.0) * level,
      "color": factor,
      "posterize": f32(8.0) - np.floor(f32(4.0) * level),
      "contrast": factor,
      "brightness": factor,
      "sharpness": factor,
      "shear_x": sign * f32(0.3) * level,
      "shear_y": sign * f32(0.3) * level,
      "translate_x": sign * f32(0.45) * level * f32(width),
      "translate_y": sign * f32(0.45) * level * f32(height),
      "solarize_add": f32(110.0) * level,
  }
  return np.asarray([args.get(name, 0.0) for name in OP_NAMES], np.float32)


# ------------------------------------------------------------ table ops (one image)
# Each returns a (3, 256) float32 table: channel c's level v becomes table[c, v].
def identity(image, arg, stats):
  del image, arg, stats
  return jnp.broadcast_to(_LEVELS, (3, 256))


def auto_contrast(image, arg, stats):
  del arg, stats
  lo = image.min(axis=(0, 1)).astype(jnp.float32)
  hi = image.max(axis=(0, 1)).astype(jnp.float32)
  # Constant channels have nothing to stretch; they stay as they are.
  stretchable = hi > lo
  scale = jnp.where(stretchable, 255.0 / jnp.maximum(hi - lo, 1.0), 1.0)
  offset = jnp.where(stretchable, lo, 0.0)
  return (_LEVELS[None] - offset[:, None]) * scale[:, None]


def histograms(images):
  """Per-channel level counts of a uint8 (B, H, W, 3) batch: (B, 3, 256) int32.

  One scatter-add over the batch, each pixel's bin a single int32 index; under `vmap`
  each index would carry the example's place too, and the count by comparison that
  avoids indices is a (B, H, W, 3, 256) array in XLA's accounting.
  """
  b = images.shape[0]
  bins = images.astype(jnp.int32) + 256 * jnp.arange(3) + 768 * jnp.arange(b)[:, None, None, None]
  return jnp.zeros(b * 768, jnp.int32).at[bins.reshape(-1)].add(1).reshape(b, 3, 256)


def equalize(image, arg, stats):
  """PIL ImageOps.equalize's per-channel tables, as augment's."""
  del image, arg
  hist = stats.hist
  # PIL excludes the count of the highest occupied bin from the step size.
  last = jnp.max(jnp.where(hist > 0, jnp.arange(256), -1), axis=1, keepdims=True)
  step = (hist.sum(axis=1, keepdims=True)
          - jnp.take_along_axis(hist, last, axis=1)) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  table = jnp.clip((below + step // 2) // jnp.maximum(step, 1), 0, 255)
  # step == 0 means (almost) a single grey level: PIL leaves it untouched.
  return jnp.where(step > 0, table, jnp.arange(256)).astype(jnp.float32)


def solarize(image, threshold, stats):
  del image, stats
  threshold = jnp.round(threshold)
  return jnp.broadcast_to(jnp.where(_LEVELS < threshold, _LEVELS, 255.0 - _LEVELS), (3, 256))


def posterize(image, bits, stats):
  del image, stats
  shift = 8 - jnp.clip(bits.astype(jnp.int32), 0, 8)
  mask = ~((1 << shift) - 1)
  table = jnp.arange(256, dtype=jnp.int32) & mask
  return jnp.broadcast_to(table.astype(jnp.float32), (3, 256))


def contrast(image, factor, stats):
  del image
  # The grey levels are integers, so their float32 sum is exact below 2**24 / 255
  # pixels (4096 x 4096) and the mean is the host's whatever the summation order.
  mean = jnp.round(jnp.mean(stats.gray.astype(jnp.float32)))
  return jnp.broadcast_to(mean + _product(factor, _LEVELS - mean), (3, 256))


def brightness(image, factor, stats):
  del image, stats
  return jnp.broadcast_to(_product(factor, _LEVELS), (3, 256))


def solarize_add(image, addition, stats, threshold=128.0):
  del image, stats
  added = jnp.clip(_LEVELS + jnp.round(addition), 0.0, 255.0)
  return jnp.broadcast_to(jnp.where(_LEVELS < threshold, added, _LEVELS), (3, 256))


# ------------------------------------------------------------ blend ops (one image)
# Each returns the degenerate float32 image that the factor blends with (PIL ImageEnhance).
def color(image, factor, stats):
  del factor
  return jnp.broadcast_to(stats.gray.astype(jnp.float32), image.shape)


def sharpness(image, factor, stats):
  """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the border unchanged."""
  del factor, stats
  x = image.astype(jnp.int32)
  h, w = image.shape[:2]
  total = 4 * x[1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      total = total + x[dy:h - 2 + dy, dx:w - 2 + dx]
  # total / 13 is never within 1/26 of a half, so rounding it exactly equals rounding
  # the host's float convolution.
  smooth = jnp.round(total.astype(jnp.float32) / 13.0)
  return image.astype(jnp.float32).at[1:-1, 1:-1].set(smooth)


# ------------------------------------- affine ops: their output -> input transform
# Each returns [a0, a1, a2, b0, b1, b2] of ImageProjectiveTransformV3 (c0 = c1 = 0).
def rotate(height, width, degrees):
  radians = degrees * (math.pi / 180.0)
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  h, w = jnp.float32(height - 1), jnp.float32(width - 1)
  x_offset = (w - (_product(cos, w) - _product(sin, h))) / 2.0
  y_offset = (h - (_product(sin, w) + _product(cos, h))) / 2.0
  return jnp.stack([cos, -sin, x_offset, sin, cos, y_offset])


def shear_x(height, width, level):
  del height, width
  return jnp.stack([1.0, -level, 0.0, 0.0, 1.0, 0.0])


def shear_y(height, width, level):
  del height, width
  return jnp.stack([1.0, 0.0, 0.0, -level, 1.0, 0.0])


def translate_x(height, width, pixels):
  del height, width
  return jnp.stack([1.0, 0.0, -pixels, 0.0, 1.0, 0.0])


def translate_y(height, width, pixels):
  del height, width
  return jnp.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels])


_IDENTITY_TRANSFORM = np.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], np.float32)


def _warp(images, transforms):
  """ImageProjectiveTransformV3(BILINEAR, CONSTANT fill) of a uint8 batch, to uint8.

  transforms: (B, 6). The five ops are affine (c0 = c1 = 0), so TF's projective divisor
  is exactly 1 and is left out. The identity transform returns an image exactly
  (weights 1 and 0): examples that drew no affine op get it. Each output pixel reads
  its 2 x 2 input neighbourhood in one gather from the images padded with grey, so
  neighbours outside an image read as grey, as TF's; points a pixel or more outside
  are filled.
  """
  b, h, w = images.shape[:3]
  t = transforms.astype(jnp.float32)[:, :, None, None, None]
  out_y = jnp.arange(h, dtype=jnp.float32)[:, None, None]
  out_x = jnp.arange(w, dtype=jnp.float32)[None, :, None]
  x = _product(t[:, 0], out_x) + _product(t[:, 1], out_y) + t[:, 2]
  y = _product(t[:, 3], out_x) + _product(t[:, 4], out_y) + t[:, 5]
  inside = (x > -1) & (x < w) & (y > -1) & (y < h)
  x, y = jnp.clip(x, -1.0, float(w)), jnp.clip(y, -1.0, float(h))
  x_floor, y_floor = jnp.floor(x), jnp.floor(y)
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)),
                   constant_values=int(FILL_VALUE)).reshape(b * (h + 2), w + 2, 3)
  # Row of the padded stack, column: two int32 per pixel (vmap would add a third).
  row = y_floor.astype(jnp.int32) + 1 + (h + 2) * jnp.arange(b)[:, None, None, None]
  column = jnp.broadcast_to(x_floor.astype(jnp.int32) + 1, row.shape)
  patch = jax.lax.gather(
      padded, jnp.concatenate([row, column], axis=-1),
      jax.lax.GatherDimensionNumbers(offset_dims=(3, 4, 5), collapsed_slice_dims=(),
                                     start_index_map=(0, 1)),
      slice_sizes=(2, 2, 3), mode=jax.lax.GatherScatterMode.CLIP)
  p = lambda i, j: patch[:, :, :, i, j].astype(jnp.float32)  # (B, H, W, 2, 2, 3) uint8.
  wx0, wx1 = x_floor + 1.0 - x, x - x_floor
  top = _product(wx0, p(0, 0)) + _product(wx1, p(0, 1))
  bottom = _product(wx0, p(1, 0)) + _product(wx1, p(1, 1))
  value = _product(y_floor + 1.0 - y, top) + _product(y - y_floor, bottom)
  return _to_uint8(jnp.where(inside, value, FILL_VALUE))


_TABLE_FNS = {name: globals()[name] for name in TABLE_OPS}
_BLEND_FNS = {name: globals()[name] for name in BLEND_OPS}
_AFFINE_FNS = {name: globals()[name] for name in AFFINE_OPS}
_KIND = np.asarray([0 if n in TABLE_OPS else 1 if n in BLEND_OPS else 2 for n in OP_NAMES])


def _slot(names, index):
  """index (into OP_NAMES) -> place among `names` (0 for ops of another kind)."""
  return jnp.asarray([names.index(n) if n in names else 0 for n in OP_NAMES])[index]


class Stats(NamedTuple):
  """What the ops read of an image besides its pixels, computed once per layer."""
  gray: jax.Array  # (H, W, 1) uint8: the rounded luma (contrast's mean, color's grey).
  hist: jax.Array  # (3, 256) int32: per-channel level counts (equalize).


def _colour_one(image, index, arg, stats):
  """The table or blend op OP_NAMES[index] on one uint8 image; others leave it as it is.

  A table op maps every level through its table; the others get the identity table.
  A blend op blends with its degenerate image; the others get factor 1, which returns
  the image exactly (its values are integers). Both degenerates read the layer's input:
  for a blend op the table was the identity.
  """
  kind = jnp.asarray(_KIND)[index]
  tables = jnp.stack([fn(image, arg, stats) for fn in _TABLE_FNS.values()])
  table = jnp.where(kind == 0, _to_uint8(tables[_slot(TABLE_OPS, index)]),
                    jnp.arange(256, dtype=jnp.uint8))
  mapped = table.reshape(-1)[image.astype(jnp.int32) + 256 * jnp.arange(3)]
  degenerates = [fn(image, arg, stats) for fn in _BLEND_FNS.values()]
  degenerate = jnp.where(_slot(BLEND_OPS, index) == 0, degenerates[0], degenerates[1])
  factor = jnp.where(kind == 1, arg, 1.0)
  return _to_uint8(degenerate + _product(factor, mapped.astype(jnp.float32) - degenerate))


def _apply(images, index, arg):
  """Op OP_NAMES[index[i]] with argument arg[i] on example i of a uint8 (B, H, W, 3) batch.

  Every example runs the same program on uint8 images, its op picking its stage's
  parameters: colour (table, blend), then warp (the identity transform for the rest).
  """
  h, w = images.shape[1:3]
  stats = Stats(_grayscale(images), histograms(images))
  images = jax.vmap(_colour_one)(images, index, arg, stats)
  transforms = jax.vmap(lambda a: jnp.stack([fn(h, w, a) for fn in _AFFINE_FNS.values()]))(arg)
  transform = jnp.where((jnp.asarray(_KIND)[index] == 2)[:, None],
                        jnp.take_along_axis(transforms, _slot(AFFINE_OPS, index)[:, None, None],
                                            axis=1)[:, 0],
                        _IDENTITY_TRANSFORM)
  return _warp(images, transform)


def apply_op(name: str, images, arg=0.0):
  """One op on every image of a uint8 (B, H, W, 3) batch; `arg` a scalar or (B,).

  `arg` is what the host op of that name takes: degrees, threshold, factor, bits,
  shear level, pixels or addition (ignored by identity, auto_contrast, equalize).
  """
  index = jnp.full(images.shape[:1], OP_NAMES.index(name), jnp.int32)
  arg = jnp.broadcast_to(jnp.asarray(arg, jnp.float32), images.shape[:1])
  return _apply_batch(images, index, arg)


# Jitted once for every op (the op is an argument, not a constant).
_apply_batch = jax.jit(_apply)


# ------------------------------------------------------------------ RandAugment
def draw(key, positions, num_layers: int) -> Tuple[jax.Array, jax.Array]:
  """Each example's op indices (B, num_layers) int32 and signs (B, num_layers) +/-1.0."""

  def one(position):
    layer_keys = jax.random.split(jax.random.fold_in(key, position), num_layers)

    def layer(k):
      op_key, sign_key = jax.random.split(k)
      index = jax.random.randint(op_key, (), 0, len(OP_NAMES), jnp.int32)
      sign = 2.0 * jax.random.randint(sign_key, (), 0, 2, jnp.int32) - 1.0
      return index, sign.astype(jnp.float32)

    return jax.vmap(layer)(layer_keys)

  return jax.vmap(one)(jnp.asarray(positions, jnp.int32))


def apply_layers(images, indices, signs, magnitude):
  """RandAugment with given ops: layer l applies OP_NAMES[indices[:, l]] at `magnitude`."""
  h, w = images.shape[1:3]
  # Row 0: sign -1, row 1: sign +1; `magnitude` is a number (a config value), not traced.
  table = jnp.asarray(np.stack([op_arguments(magnitude, s, h, w) for s in (-1.0, 1.0)]))

  def layer(images, drawn):
    index, sign = drawn
    return _apply(images, index, table[(sign > 0).astype(jnp.int32), index]), None

  # A loop, not an unrolled one: XLA would fuse a layer's warp into the next layer's
  # reads and recompute it for each (4-8x the CPU time at 2 layers); one body also
  # compiles once.
  return jax.lax.scan(layer, images, (indices.T, signs.T))[0]


def randaugment(images, key, positions, num_layers: int = 2, magnitude=15):
  """`num_layers` ops drawn uniformly from OP_NAMES per example, at `magnitude` (0-30).

  images: uint8 (B, H, W, 3); key: `fold_in(key(seed), step)`; positions: (B,) int, the
  examples' places in the global batch; num_layers and magnitude: numbers (config values,
  static under jit).
  """
  if num_layers == 0:
    return images
  indices, signs = draw(key, positions, num_layers)
  return apply_layers(images, indices, signs, magnitude)


def random_flip(images, key, positions):
  """Flips each example left-right with probability 0.5, keyed like `randaugment`."""
  flip = jax.vmap(lambda p: jax.random.bernoulli(jax.random.fold_in(key, p)))(
      jnp.asarray(positions, jnp.int32))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def to_model_range(images):
  """uint8 -> float32 in [-1, 1], as the host pipeline's scaling."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def augment_batch(images, key, positions, *, flip: bool, num_layers: int, magnitude=15):
  """The paper's device half: flip, RandAugment, scaling to [-1, 1] (host order)."""
  flip_key, randaugment_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  if flip:
    images = random_flip(images, flip_key, positions)
  images = randaugment(images, randaugment_key, positions, num_layers, magnitude)
  return to_model_range(images)
