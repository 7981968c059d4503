"""Tests for mixer_jax.augment: each op is checked for its defining property."""

import io

import numpy as np
from PIL import Image, ImageOps
import pytest
import tensorflow as tf

from mixer_jax import augment

H, W = 16, 16


def _img(seed=0, shape=(H, W, 3), low=0, high=256):
  rng = np.random.default_rng(seed)
  return rng.integers(low, high, shape, dtype=np.uint8)


def _np(x):
  x = x.numpy()
  assert x.dtype == np.uint8
  return x


def _seed(i):
  return tf.constant([i, 1234], tf.int32)


def _luma(img):
  x = img.astype(np.float64)
  return np.round(0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])


# ----------------------------------------------------------------------------
# Pixel ops.
# ----------------------------------------------------------------------------


def test_identity():
  img = _img()
  np.testing.assert_array_equal(_np(augment.identity(img)), img)


def test_solarize_inverts_at_and_above_threshold():
  img = _img()
  out = _np(augment.solarize(img, 128)).astype(int)
  hi = img >= 128
  np.testing.assert_array_equal(out[hi], 255 - img[hi].astype(int))
  np.testing.assert_array_equal(out[~hi], img[~hi])
  np.testing.assert_array_equal(
      out, np.array(ImageOps.solarize(Image.fromarray(img), 128)))
  np.testing.assert_array_equal(_np(augment.solarize(img, 256)), img)
  np.testing.assert_array_equal(_np(augment.solarize(img, 0)), 255 - img)


def test_solarize_add_adds_below_threshold_with_clipping():
  img = _img()
  out = _np(augment.solarize_add(img, 200, threshold=128)).astype(int)
  lo = img < 128
  np.testing.assert_array_equal(out[lo],
                                np.minimum(img[lo].astype(int) + 200, 255))
  np.testing.assert_array_equal(out[~lo], img[~lo])
  assert (out[lo] == 255).any() and (out[lo] < 255).any()  # clipping exercised
  np.testing.assert_array_equal(_np(augment.solarize_add(img, 0)), img)


@pytest.mark.parametrize("bits", [1, 4, 6, 8])
def test_posterize_keeps_top_bits(bits):
  img = _img()
  mask = (0xFF << (8 - bits)) & 0xFF
  np.testing.assert_array_equal(_np(augment.posterize(img, bits)), img & mask)


def test_auto_contrast_stretches_each_channel():
  img = _img(low=60, high=190)
  img[..., 2] = 77  # a constant channel cannot be stretched: left unchanged
  out = _np(augment.auto_contrast(img))
  for c in range(2):
    assert out[..., c].min() == 0 and out[..., c].max() == 255
    # Linear stretch: order preserved within the channel.
    order = np.argsort(img[..., c], axis=None, kind="stable")
    assert np.all(np.diff(out[..., c].ravel()[order].astype(int)) >= 0)
  np.testing.assert_array_equal(out[..., 2], 77)


def test_equalize_matches_pil_and_flattens_histogram():
  # Values squeezed into [100, 140): equalization spreads them over 0..255.
  img = _img(shape=(64, 64, 3), low=100, high=140)
  out = _np(augment.equalize(img))
  np.testing.assert_array_equal(
      out, np.array(ImageOps.equalize(Image.fromarray(img))))
  for c in range(3):
    ch = out[..., c].ravel()
    assert ch.min() < 10 and ch.max() > 240
    # Cumulative histogram close to the uniform one.
    cdf = np.cumsum(np.bincount(ch, minlength=256)) / ch.size
    occupied = np.unique(ch)
    assert np.max(np.abs(cdf[occupied] - occupied / 255.0)) < 0.12


def test_equalize_is_identity_on_equalized_ramp():
  ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
  img = np.stack([ramp, ramp.T, ramp[::-1]], axis=-1)
  np.testing.assert_array_equal(_np(augment.equalize(img)), img)


def test_color():
  img = _img()
  np.testing.assert_array_equal(_np(augment.color(img, 1.0)), img)
  gray = _np(augment.color(img, 0.0))
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  assert np.abs(gray[..., 0].astype(int) - _luma(img)).max() <= 1


def test_contrast():
  img = _img()
  np.testing.assert_array_equal(_np(augment.contrast(img, 1.0)), img)
  flat = _np(augment.contrast(img, 0.0))
  assert np.all(flat == flat.flat[0])
  assert abs(int(flat.flat[0]) - _luma(img).mean()) <= 1
  # Factor > 1 pushes pixels away from the mean.
  mean = _luma(img).mean()
  more = _np(augment.contrast(img, 1.5)).astype(float)
  assert np.abs(more - mean).mean() > np.abs(img - mean).mean()


def test_brightness():
  img = _img()
  np.testing.assert_array_equal(_np(augment.brightness(img, 0.0)), 0)
  np.testing.assert_array_equal(_np(augment.brightness(img, 1.0)), img)
  np.testing.assert_array_equal(_np(augment.brightness(img, 2.0)),
                                np.minimum(img.astype(int) * 2, 255))


def test_sharpness():
  img = _img()
  np.testing.assert_array_equal(_np(augment.sharpness(img, 1.0)), img)
  x = img.astype(np.float64)
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
  smooth = np.zeros_like(x[1:-1, 1:-1])
  for dy in range(3):
    for dx in range(3):
      smooth += kernel[dy, dx] * x[dy:dy + H - 2, dx:dx + W - 2]
  for factor in (0.0, 2.0):
    out = _np(augment.sharpness(img, factor))
    border = np.ones((H, W), bool)
    border[1:-1, 1:-1] = False
    np.testing.assert_array_equal(out[border], img[border])
  out0 = _np(augment.sharpness(img, 0.0)).astype(int)
  assert np.abs(out0[1:-1, 1:-1] - smooth).max() <= 1


# ----------------------------------------------------------------------------
# Geometric ops.
# ----------------------------------------------------------------------------


def test_rotate():
  img = _img()
  np.testing.assert_array_equal(_np(augment.rotate(img, 0.0)), img)
  # Positive angles are counter-clockwise, like np.rot90.
  out = _np(augment.rotate(img, 90.0))
  np.testing.assert_array_equal(out[1:-1, 1:-1], np.rot90(img)[1:-1, 1:-1])
  out = _np(augment.rotate(img, -90.0))
  np.testing.assert_array_equal(out[1:-1, 1:-1],
                                np.rot90(img, k=-1)[1:-1, 1:-1])
  # 45 degrees uncovers the corners, filled with grey.
  out = _np(augment.rotate(img, 45.0))
  np.testing.assert_array_equal(out[0, 0], 128)
  np.testing.assert_array_equal(out[-1, -1], 128)


def test_translate():
  img = _img()
  out = _np(augment.translate_x(img, 3.0))
  np.testing.assert_array_equal(out[:, 3:], img[:, :-3])
  np.testing.assert_array_equal(out[:, :3], 128)
  out = _np(augment.translate_x(img, -2.0))
  np.testing.assert_array_equal(out[:, :-2], img[:, 2:])
  np.testing.assert_array_equal(out[:, -2:], 128)
  out = _np(augment.translate_y(img, 4.0))
  np.testing.assert_array_equal(out[4:], img[:-4])
  np.testing.assert_array_equal(out[:4], 128)
  out = _np(augment.translate_y(img, -1.0))
  np.testing.assert_array_equal(out[:-1], img[1:])
  np.testing.assert_array_equal(out[-1:], 128)


def test_shear():
  img = _img()
  # Row y moves right by 0.25 * y: exact integer shifts on every 4th row.
  out = _np(augment.shear_x(img, 0.25))
  for y in (0, 4, 8, 12):
    s = y // 4
    np.testing.assert_array_equal(out[y, s:], img[y, :W - s])
    np.testing.assert_array_equal(out[y, :s], 128)
  # Column x moves down by 0.25 * x.
  out = _np(augment.shear_y(img, 0.25))
  for x in (0, 4, 8, 12):
    s = x // 4
    np.testing.assert_array_equal(out[s:, x], img[:H - s, x])
    np.testing.assert_array_equal(out[:s, x], 128)
  np.testing.assert_array_equal(_np(augment.shear_x(img, 0.0)), img)


# ----------------------------------------------------------------------------
# Magnitude convention of OPS.
# ----------------------------------------------------------------------------


def test_ops_table():
  assert set(augment.OPS) == {
      "identity", "auto_contrast", "equalize", "rotate", "solarize", "color",
      "posterize", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
      "translate_x", "translate_y", "solarize_add"
  }


def test_ops_at_magnitude_zero_are_identity():
  img = _img()
  for name, fn in augment.OPS.items():
    out = _np(fn(tf.constant(img), 0, _seed(1)))
    assert out.shape == img.shape
    if name not in ("auto_contrast", "equalize"):
      np.testing.assert_array_equal(out, img, err_msg=name)


def test_ops_at_magnitude_30():
  img = _img()
  ops = augment.OPS
  np.testing.assert_array_equal(_np(ops["solarize"](img, 30, _seed(0))),
                                255 - img)
  np.testing.assert_array_equal(_np(ops["posterize"](img, 30, _seed(0))),
                                img & 0xF0)
  np.testing.assert_array_equal(_np(ops["solarize_add"](img, 30, _seed(0))),
                                augment.solarize_add(img, 110).numpy())
  np.testing.assert_array_equal(_np(ops["posterize"](img, 15, _seed(0))),
                                img & 0xFC)
  np.testing.assert_array_equal(_np(ops["solarize"](img, 15, _seed(0))),
                                augment.solarize(img, 128).numpy())


def test_signed_ops_use_both_signs_at_magnitude_15():
  img = _img()
  candidates = {
      "rotate": (augment.rotate, 15.0),
      "translate_x": (augment.translate_x, 0.225 * W),
      "shear_y": (augment.shear_y, 0.15),
      "color": (lambda im, d: augment.color(im, 1.0 + d), 0.45),
  }
  for name, (fn, arg) in candidates.items():
    plus, minus = _np(fn(img, arg)), _np(fn(img, -arg))
    seen = set()
    for i in range(8):
      out = _np(augment.OPS[name](img, 15, _seed(i)))
      if np.array_equal(out, plus):
        seen.add("+")
      elif np.array_equal(out, minus):
        seen.add("-")
      else:
        pytest.fail(f"{name} output is neither +{arg} nor -{arg}")
    assert seen == {"+", "-"}, name


# ----------------------------------------------------------------------------
# RandAugment.
# ----------------------------------------------------------------------------


def test_randaugment_shape_dtype_and_determinism():
  img = _img(shape=(24, 20, 3))
  outs = []
  for i in range(6):
    a = augment.randaugment(img, _seed(i))
    b = augment.randaugment(img, _seed(i))
    assert a.dtype == tf.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    outs.append(a.numpy().tobytes())
  # Different seeds (almost always) give different results.
  assert len(set(outs)) >= 5


def test_randaugment_in_dataset_map_with_unknown_shape():
  sizes = [(20, 24), (17, 31), (32, 16)]
  images = [_img(i, shape=(h, w, 3)) for i, (h, w) in enumerate(sizes)]
  base = tf.constant([7, 11], tf.int64)

  ds = tf.data.Dataset.from_generator(
      lambda: iter(images),
      output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  ds = ds.enumerate().map(lambda i, x: augment.randaugment(
      x, tf.random.experimental.stateless_fold_in(base, i), magnitude=20))
  assert ds.element_spec.shape.as_list() == [None, None, 3]

  first = list(ds.as_numpy_iterator())
  second = list(ds.as_numpy_iterator())
  for i, (img, a, b) in enumerate(zip(images, first, second)):
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # Graph mode (tf.data) and eager mode agree bit-exactly. The index must be
    # int64 like enumerate()'s: fold_in's output dtype (and value) follow it.
    seed = tf.random.experimental.stateless_fold_in(
        base, tf.constant(i, tf.int64))
    eager = augment.randaugment(img, seed, magnitude=20)
    np.testing.assert_array_equal(a, eager.numpy())


# ----------------------------------------------------------------------------
# Cropping and flipping.
# ----------------------------------------------------------------------------


def _coordinate_image(h, w):
  """Pixel (y, x) holds (y, x, 0) so a crop reveals its own position."""
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)


def test_inception_crop():
  h, w = 100, 120
  img = _coordinate_image(h, w)
  shapes = set()
  for i in range(6):
    crop = _np(augment.inception_crop(img, _seed(i)))
    np.testing.assert_array_equal(crop,
                                  _np(augment.inception_crop(img, _seed(i))))
    ch, cw, _ = crop.shape
    y0, x0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])
    np.testing.assert_array_equal(crop, img[y0:y0 + ch, x0:x0 + cw])
    assert 0.08 - 0.01 <= ch * cw / (h * w) <= 1.0
    assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05
    shapes.add(crop.shape)
  assert len(shapes) > 1

  crop = _np(augment.inception_crop(img, _seed(0), area_range=(0.5, 0.6)))
  assert 0.49 <= crop.shape[0] * crop.shape[1] / (h * w) <= 0.61


def _encode(img, fmt, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"subsampling": 0}),
                                        ("PNG", {})])
def test_decode_and_inception_crop_matches_decode_then_crop(fmt, kwargs):
  img = _img(shape=(48, 64, 3))
  data = tf.constant(_encode(img, fmt, **kwargs))
  decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
  seeds = [_seed(i) for i in range(3)]
  for seed in seeds:
    fast = _np(augment.decode_and_inception_crop(data, seed))
    ref = _np(augment.inception_crop(decoded, seed))
    np.testing.assert_array_equal(fast, ref)

  # Same in graph mode.
  ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
      lambda s: augment.decode_and_inception_crop(data, s))
  assert ds.element_spec.shape.as_list() == [None, None, 3]
  for seed, out in zip(seeds, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(out,
                                  _np(augment.inception_crop(decoded, seed)))


def test_decode_and_inception_crop_subsampled_jpeg():
  # With 4:2:0 chroma, libjpeg's windowed decode upsamples chroma without the
  # neighbours outside the window, so only the first/last column may differ.
  img = _img(shape=(48, 64, 3))
  data = tf.constant(_encode(img, "JPEG"))
  decoded = tf.io.decode_jpeg(data, channels=3)
  for i in range(4):
    fast = _np(augment.decode_and_inception_crop(data, _seed(i)))
    ref = _np(augment.inception_crop(decoded, _seed(i)))
    assert fast.shape == ref.shape
    np.testing.assert_array_equal(fast[:, 1:-1], ref[:, 1:-1])


def test_random_flip():
  img = _img()
  seen = set()
  for i in range(12):
    out = _np(augment.random_flip(img, _seed(i)))
    np.testing.assert_array_equal(out, _np(augment.random_flip(img, _seed(i))))
    if np.array_equal(out, img):
      seen.add("same")
    elif np.array_equal(out, img[:, ::-1]):
      seen.add("flipped")
    else:
      pytest.fail("random_flip returned neither the image nor its mirror")
  assert seen == {"same", "flipped"}


def test_pad_and_crop_shifts_within_the_padding():
  image = tf.constant(np.arange(1, 6 * 6 * 3 + 1).reshape(6, 6, 3) % 250 + 1, tf.uint8)
  padded = np.pad(image.numpy(), [(2, 2), (2, 2), (0, 0)])
  offsets = set()
  for s in range(40):
    out = augment.pad_and_crop(image, tf.constant([s, 7]), 2).numpy()
    assert out.shape == (6, 6, 3)
    # The output is one 6x6 window of the zero-padded image; find its offset.
    found = [(dy, dx) for dy in range(5) for dx in range(5)
             if np.array_equal(padded[dy:dy + 6, dx:dx + 6], out)]
    assert len(found) == 1
    offsets.add(found[0])
  assert len(offsets) > 10  # Many of the 25 shifts are drawn, unshifted among them or not.
  again = augment.pad_and_crop(image, tf.constant([3, 7]), 2).numpy()
  assert np.array_equal(again, augment.pad_and_crop(image, tf.constant([3, 7]), 2).numpy())
