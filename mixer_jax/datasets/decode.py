"""One decode for every entry point: image file bytes -> uint8 RGB pixels.

Training and evaluation (inside tf.data) and predict (eagerly, on files) all call
`decode_rgb`, so one file reaches the model as the same pixels everywhere. It is
`tf.io.decode_image(..., channels=3)`: 16-bit PNGs are scaled to 8 bits (v / 257,
where PIL's `convert("RGB")` clips them to white), greyscale and palette images become
RGB, alpha is dropped (not composited), CMYK JPEGs are converted by libjpeg, and an
animated GIF gives its first frame. EXIF orientation is not applied: the stored pixel
grid is used as is, as in the TFDS ImageNet records the released models were trained on.
`resize` is the one resize of the pipelines (bilinear with antialiasing, rounded).
"""

import io
import struct
from typing import Optional, Tuple

from PIL import Image
import tensorflow as tf

# PIL's own decompression-bomb line (twice its warning threshold): larger images are
# refused before decoding rather than filling the host's memory.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


def pixel_size(data: bytes) -> Optional[Tuple[int, int]]:
  """(width, height) from an image file's header, however large (PIL's own `open`
  raises before telling the size of a decompression bomb); None if PIL cannot read it."""
  Image.init()
  prefix = data[:16]
  for fmt in Image.ID:
    factory, accept = Image.OPEN[fmt]
    if accept is not None and not accept(prefix):
      continue
    try:
      return tuple(factory(io.BytesIO(data), None).size)
    except (SyntaxError, IndexError, TypeError, ValueError, struct.error, OSError):
      continue
  return None


def too_large(size: Optional[Tuple[int, int]]) -> Optional[str]:
  """The reason an image of `size` is refused ("W x H pixels, more than N"), or None."""
  if size is None or size[0] * size[1] <= MAX_PIXELS:
    return None
  return f"{size[0]} x {size[1]} pixels, more than {MAX_PIXELS:,}"


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF/WebP bytes -> uint8 [H, W, 3]; works in tf.data."""
  image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: bilinear with antialiasing, rounded."""
  image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def load_rgb(path: str):
  """The pixels of an image file as numpy uint8 [H, W, 3] (`decode_rgb`, eagerly).

  ValueError with one sentence if the file cannot be read, is not an image, or is
  larger than MAX_PIXELS.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"Cannot read image {path} ({e.strerror or type(e).__name__}); "
                     "pass a readable image file (JPEG, PNG, ...).") from None
  # Not PIL-readable (size None): tf.io.decode_image decides below.
  reason = too_large(pixel_size(data))
  if reason:
    raise ValueError(f"Image {path} is too large ({reason}); resize it before predicting.")
  try:
    return decode_rgb(tf.constant(data)).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
    raise ValueError(f"Cannot read image {path} (not a JPEG, PNG, BMP, GIF or WebP "
                     "image); pass a readable image file (JPEG, PNG, ...).") from None
