"""Stateless image augmentation for tf.data pipelines (core TensorFlow only).

All ops take and return uint8 ``[H, W, 3]`` tensors whose height and width may
be unknown until run time, so they work inside ``tf.data.Dataset.map``.

Every random function takes ``seed``: an int32/int64 tensor of shape ``[2]`` as
used by ``tf.random.stateless_uniform``. Sub-seeds are derived with
``tf.random.experimental.stateless_split``; no stateful RNG is used anywhere,
so the augmented data is a pure function of (seed, example) and a resumed run
reproduces it bit-exactly.

RandAugment magnitude convention
--------------------------------
``magnitude`` is on a 0-30 scale (clipped to it); ``m = magnitude / 30`` is the
op strength, linear in the magnitude, and 30 is the strongest setting. Signed
ops get a random sign (+/- with equal probability). At magnitude 15 (the
default, m = 0.5):

==============  ============================  ==================================
op              argument                      magnitude 15
==============  ============================  ==================================
identity        --                            --
auto_contrast   --                            --
equalize        --                            --
rotate          +/- 30 * m degrees            +/- 15 degrees
solarize        threshold 256 - 256 * m       128 (pixels >= 128 are inverted)
color           factor 1 +/- 0.9 * m          0.55 or 1.45
posterize       bits 8 - floor(4 * m)         6 bits kept
contrast        factor 1 +/- 0.9 * m          0.55 or 1.45
brightness      factor 1 +/- 0.9 * m          0.55 or 1.45
sharpness       factor 1 +/- 0.9 * m          0.55 or 1.45
shear_x/y       +/- 0.3 * m                   +/- 0.15
translate_x/y   +/- 0.45 * m * side pixels    +/- 22.5% of the width / height
solarize_add    +110 * m below 128            +55 to pixels < 128
==============  ============================  ==================================

At magnitude 30 the enhance factors span 0.1..1.9, rotation is +/-30 degrees,
shear +/-0.3, translation +/-45% of the side (~100 px at 224), posterize keeps
4 bits, solarize inverts every pixel and solarize_add adds 110.
Geometric ops fill uncovered pixels with grey (128).
"""

import math

import tensorflow as tf

MAX_MAGNITUDE = 30.0
FILL_VALUE = 128.0

# PIL's ITU-R 601-2 luma weights, so grey levels match PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _to_uint8(x):
  """Rounds and saturates a float image to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance blend: 0 -> degenerate, 1 -> image, >1 extrapolates."""
  factor = tf.cast(factor, tf.float32)
  image = tf.cast(image, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def _grayscale(image):
  """Rounded luma of a uint8 RGB image as float32 [H, W, 1]."""
  x = tf.cast(image, tf.float32)
  gray = tf.tensordot(x, tf.constant(_LUMA, tf.float32), axes=[[2], [0]])
  return tf.round(gray)[..., None]


def _transform(image, transform):
  """Applies an output->input projective transform, filling with grey.

  Bilinear interpolation is done in float32 and rounded back, so integer
  shifts and multiples of 90 degrees reproduce pixels exactly.
  """
  transform = tf.stack([tf.cast(t, tf.float32) for t in transform])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None],
      transforms=transform[None],
      output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation="BILINEAR",
      fill_mode="CONSTANT")
  return _to_uint8(out[0])


def _level(magnitude):
  """Maps a 0-30 magnitude to a strength in [0, 1]."""
  magnitude = tf.cast(magnitude, tf.float32)
  return tf.clip_by_value(magnitude, 0.0, MAX_MAGNITUDE) / MAX_MAGNITUDE


def _random_sign(seed):
  """+1 or -1 with equal probability."""
  coin = tf.random.stateless_uniform([], seed, minval=0, maxval=2,
                                     dtype=tf.int32)
  return tf.cast(2 * coin - 1, tf.float32)


# ----------------------------------------------------------------------------
# Individual ops (deterministic given their arguments).
# ----------------------------------------------------------------------------


def identity(image):
  """Returns the image unchanged."""
  return tf.identity(image)


def auto_contrast(image):
  """Stretches each channel linearly so its min maps to 0 and max to 255."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  # Constant channels have nothing to stretch; leave them as they are.
  stretchable = hi > lo
  scale = tf.where(stretchable, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(stretchable, lo, 0.0)
  return _to_uint8((x - offset) * scale)


def _equalize_channel(channel):
  """PIL ImageOps.equalize on one int32 [H, W] channel."""
  hist = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256,
                          maxlength=256, dtype=tf.int32)
  # PIL excludes the count of the highest occupied bin from the step size.
  last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1))
  step = (tf.reduce_sum(hist) - tf.gather(hist, last)) // 255
  safe_step = tf.maximum(step, 1)
  # lut[i] = (#pixels below i + step // 2) // step.
  below = tf.cumsum(hist, exclusive=True)
  lut = tf.clip_by_value((below + step // 2) // safe_step, 0, 255)
  # step == 0 means (almost) a single grey level: PIL leaves it untouched.
  return tf.where(step > 0, tf.gather(lut, channel), channel)


def equalize(image):
  """Per-channel histogram equalization (PIL ImageOps.equalize semantics)."""
  x = tf.cast(image, tf.int32)
  channels = [_equalize_channel(x[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def rotate(image, degrees):
  """Rotates counter-clockwise (as np.rot90 / PIL) about the image centre."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  shape = tf.cast(tf.shape(image), tf.float32)
  h, w = shape[0] - 1.0, shape[1] - 1.0
  # Output->input map: rotate about ((w)/2, (h)/2) in pixel-centre coordinates.
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def shear_x(image, level):
  """Shears about the top-left corner: row y moves right by level * y px."""
  return _transform(image, [1.0, -level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level):
  """Shears about the top-left corner: column x moves down by level * x px."""
  return _transform(image, [1.0, 0.0, 0.0, -level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, pixels):
  """Moves the content right by `pixels` (left if negative)."""
  return _transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, pixels):
  """Moves the content down by `pixels` (up if negative)."""
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0])


def solarize(image, threshold=128):
  """Inverts every pixel >= threshold (threshold 256: no-op, 0: full invert)."""
  x = tf.cast(image, tf.int32)
  threshold = tf.cast(tf.round(tf.cast(threshold, tf.float32)), tf.int32)
  return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)


def solarize_add(image, addition, threshold=128):
  """Adds `addition` (saturating) to every pixel below threshold."""
  x = tf.cast(image, tf.int32)
  addition = tf.cast(tf.round(tf.cast(addition, tf.float32)), tf.int32)
  threshold = tf.cast(tf.round(tf.cast(threshold, tf.float32)), tf.int32)
  added = tf.clip_by_value(x + addition, 0, 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def posterize(image, bits):
  """Keeps the `bits` most significant bits of every pixel."""
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  # Mask in int32: a uint8 shift by 8 would be implementation defined.
  mask = tf.bitwise.invert(tf.bitwise.left_shift(1, shift) - 1)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask),
                 tf.uint8)


def color(image, factor):
  """Saturation: 0 -> greyscale, 1 -> unchanged (PIL ImageEnhance.Color)."""
  return _blend(_grayscale(image), image, factor)


def contrast(image, factor):
  """0 -> uniform mean grey, 1 -> unchanged (PIL ImageEnhance.Contrast)."""
  mean = tf.round(tf.reduce_mean(_grayscale(image)))
  return _blend(mean, image, factor)


def brightness(image, factor):
  """0 -> black, 1 -> unchanged (PIL ImageEnhance.Brightness)."""
  return _blend(0.0, image, factor)


def sharpness(image, factor):
  """0 -> smoothed, 1 -> unchanged, >1 sharpened (PIL ImageEnhance.Sharpness).

  The degenerate image is PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]]/13) on
  the interior; border pixels are left untouched, as PIL does.
  """
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, strides=[1, 1, 1, 1],
                                  padding="VALID")[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  # Put the VALID result back in place and keep the original 1-pixel border.
  paddings = [[1, 1], [1, 1], [0, 0]]
  interior = tf.pad(tf.ones_like(smooth, tf.bool), paddings)
  degenerate = tf.where(interior, tf.pad(smooth, paddings), x)
  return _blend(degenerate, image, factor)


# ----------------------------------------------------------------------------
# RandAugment.
# ----------------------------------------------------------------------------


def _enhance_factor(magnitude, seed):
  return 1.0 + _random_sign(seed) * 0.9 * _level(magnitude)


def _side(image, axis):
  return tf.cast(tf.shape(image)[axis], tf.float32)


# name -> fn(image, magnitude, seed). Order fixes the switch_case index.
OPS = {
    "identity": lambda img, m, s: identity(img),
    "auto_contrast": lambda img, m, s: auto_contrast(img),
    "equalize": lambda img, m, s: equalize(img),
    "rotate": lambda img, m, s: rotate(
        img, _random_sign(s) * 30.0 * _level(m)),
    "solarize": lambda img, m, s: solarize(img, 256.0 - 256.0 * _level(m)),
    "color": lambda img, m, s: color(img, _enhance_factor(m, s)),
    "posterize": lambda img, m, s: posterize(
        img, 8 - tf.cast(tf.floor(4.0 * _level(m)), tf.int32)),
    "contrast": lambda img, m, s: contrast(img, _enhance_factor(m, s)),
    "brightness": lambda img, m, s: brightness(img, _enhance_factor(m, s)),
    "sharpness": lambda img, m, s: sharpness(img, _enhance_factor(m, s)),
    "shear_x": lambda img, m, s: shear_x(
        img, _random_sign(s) * 0.3 * _level(m)),
    "shear_y": lambda img, m, s: shear_y(
        img, _random_sign(s) * 0.3 * _level(m)),
    "translate_x": lambda img, m, s: translate_x(
        img, _random_sign(s) * 0.45 * _level(m) * _side(img, 1)),
    "translate_y": lambda img, m, s: translate_y(
        img, _random_sign(s) * 0.45 * _level(m) * _side(img, 0)),
    "solarize_add": lambda img, m, s: solarize_add(img, 110.0 * _level(m)),
}


def randaugment(image, seed, num_layers=2, magnitude=15):
  """Applies `num_layers` ops drawn uniformly from OPS at `magnitude` (0-30)."""
  image = tf.convert_to_tensor(image)
  seed = tf.convert_to_tensor(seed)
  static_shape = image.shape
  ops = list(OPS.values())
  layer_seeds = tf.random.experimental.stateless_split(seed, num=num_layers)
  for i in range(num_layers):
    op_seed, arg_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[i], num=2))
    index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(ops),
                                        dtype=tf.int32)
    # Bind loop variables now; switch_case runs only the chosen branch.
    branches = [
        lambda fn=fn, img=image: fn(img, magnitude, arg_seed) for fn in ops
    ]
    image = tf.switch_case(index, branches)
    image.set_shape(static_shape)
  return image


# ----------------------------------------------------------------------------
# Cropping and flipping.
# ----------------------------------------------------------------------------


def _sample_crop(image_shape, seed, area_range, aspect_ratio_range):
  """Samples an Inception-style crop window: (begin, size) of [h, w, c]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=seed,
      # No object to cover: only area and aspect ratio constrain the crop.
      min_object_covered=0.0,
      aspect_ratio_range=aspect_ratio_range,
      area_range=area_range,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def inception_crop(image, seed, *, area_range=(0.08, 1.0),
                   aspect_ratio_range=(3 / 4, 4 / 3)):
  """Random Inception crop (area and aspect ratio in range); not resized."""
  begin, size = _sample_crop(tf.shape(image), seed, area_range,
                             aspect_ratio_range)
  # size[2] is -1 ("all channels"), which tf.slice understands.
  return tf.slice(image, begin, size)


def decode_and_inception_crop(encoded_bytes, seed, *, area_range=(0.08, 1.0),
                              aspect_ratio_range=(3 / 4, 4 / 3)):
  """Decodes image bytes to uint8 RGB and applies `inception_crop`.

  JPEGs are decoded only inside the crop window (much faster for large images);
  other formats (PNG, ...) are fully decoded then cropped. The crop window is
  the same as `inception_crop` on the decoded image with the same seed; pixels
  are identical too, except that for chroma-subsampled JPEGs the window's first
  and last columns can differ slightly (libjpeg upsamples chroma without the
  neighbours outside the window).
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded_bytes)
    begin, size = _sample_crop(shape, seed, area_range, aspect_ratio_range)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(encoded_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(encoded_bytes, channels=3,
                               expand_animations=False)
    return inception_crop(image, seed, area_range=area_range,
                          aspect_ratio_range=aspect_ratio_range)

  image = tf.cond(tf.io.is_jpeg(encoded_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def random_flip(image, seed):
  """Flips left-right with probability 0.5."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def pad_and_crop(image, seed, padding):
  """Pads `padding` black pixels on every side, then crops the original size at a
  random offset: the shift augmentation of small-image training (CIFAR, MNIST)."""
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, shape, seed)
