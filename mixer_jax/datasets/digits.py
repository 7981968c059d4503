"""TFDS builder ``mixer_digits``: scikit-learn's 8x8 handwritten digits.

The data is the optical-recognition digits set that ships *inside*
scikit-learn (``sklearn.datasets.load_digits()``: 1,797 grey 8x8 images,
10 classes, integer pixel values 0..16), so preparing it never touches the
network: the builder has no URLs and downloads nothing.

Importing this module registers the builder with TFDS, after which both

    import mixer_jax.datasets.digits
    builder = tfds.builder('mixer_digits', data_dir=DIR)
    builder.download_and_prepare()

and the helper ``prepare(DIR)`` (which prepares only if needed and returns the
builder) work offline. Preparation writes ~0.45 MB and takes ~0.6 s once
TensorFlow is loaded (~3 s in a fresh process, most of it TensorFlow's own
start-up); later calls find the prepared data and return in milliseconds.

Features
--------
``image``: ``tfds.features.Image(shape=(8, 8, 3), dtype=uint8)``. Each pixel
  value v in 0..16 becomes ``floor(v * 255 / 16 + 0.5)`` (round half up, so
  0 -> 0, 8 -> 128, 16 -> 255) and the grey value is replicated to 3 channels
  so the same RGB input pipeline works for every dataset.
``label``: ``tfds.features.ClassLabel(names=['0', ..., '9'])``.
``id``: int64, the example's index in ``load_digits()`` (0..1796); it is also
  the TFDS example key, so the record order inside each split is fixed.

Split rule (fixed, stratified, deterministic)
---------------------------------------------
For each class c, take the indices i with ``target[i] == c`` in increasing
order; the example at position p (0-based) of that list goes to ``test`` when
``p % 5 == 4`` and to ``train`` otherwise (every 5th example of every class is
a test example). Exact counts:

    class:   0    1    2    3    4    5    6    7    8    9   total
    train: 143  146  142  147  145  146  145  144  140  144    1442
    test:   35   36   35   36   36   36   36   35   34   36     355

i.e. ``train`` = 1,442 and ``test`` = 355 examples (1,797 in all).
There is no separate validation split; slice train if you need one
(e.g. ``train[:90%]`` / ``train[90%:]``).
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

NAME = 'mixer_digits'
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
TEST_EVERY = 5  # position-within-class p goes to test iff p % 5 == 4.
SPLIT_SIZES = {'train': 1442, 'test': 355}
CLASS_COUNTS = {
    'train': (143, 146, 142, 147, 145, 146, 145, 144, 140, 144),
    'test': (35, 36, 35, 36, 36, 36, 36, 35, 34, 36),
}


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
  """[N, 8, 8] values 0..16 -> [N, 8, 8, 3] uint8, round(v * 255 / 16)."""
  scaled = np.floor(np.asarray(images, np.float64) * 255.0 / 16.0 + 0.5)
  scaled = np.clip(scaled, 0, 255).astype(np.uint8)
  return np.repeat(scaled[..., None], 3, axis=-1)


def split_indices(targets: np.ndarray) -> Dict[str, np.ndarray]:
  """Returns sorted example indices of each split (see module docstring)."""
  targets = np.asarray(targets)
  is_test = np.zeros(len(targets), bool)
  for c in np.unique(targets):
    idx = np.sort(np.flatnonzero(targets == c))
    is_test[idx[np.arange(len(idx)) % TEST_EVERY == TEST_EVERY - 1]] = True
  return {'train': np.flatnonzero(~is_test), 'test': np.flatnonzero(is_test)}


def _load():
  from sklearn.datasets import load_digits  # Reads a file bundled in sklearn.
  d = load_digits()
  return d.images, d.target.astype(np.int64)


class MixerDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn 8x8 digits as 8x8x3 uint8 images, fixed train/test split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            '8x8 handwritten digits from scikit-learn (load_digits), scaled '
            'to uint8 and replicated to 3 channels. Test = every 5th example '
            'of each class (position-within-class % 5 == 4).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(
                names=[str(i) for i in range(NUM_CLASSES)]),
            'id': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        citation=(
            '@misc{optical_recognition_of_handwritten_digits_80, '
            'author={Alpaydin, E. and Kaynak, C.}, '
            'title={{Optical Recognition of Handwritten Digits}}, '
            'year={1998}, howpublished={UCI Machine Learning Repository}}'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the data ships with scikit-learn.
    images, targets = _load()
    images = to_uint8_rgb(images)
    splits = split_indices(targets)
    return {
        name: self._generate_examples(images, targets, idx)
        for name, idx in splits.items()
    }

  def _generate_examples(self, images, targets, indices
                         ) -> Iterator[Tuple[int, dict]]:
    for i in indices:
      i = int(i)
      yield i, {'image': images[i], 'label': int(targets[i]), 'id': i}


def prepare(data_dir: str) -> MixerDigits:
  """Prepares ``mixer_digits`` under ``data_dir`` if needed; returns builder.

  Offline: no URLs, GCS lookup disabled. Safe to call repeatedly (a prepared
  dataset is reused); TFDS writes into a temporary directory and renames it,
  so an interrupted preparation is redone rather than half-read.
  """
  data_dir = os.fspath(data_dir)
  builder = MixerDigits(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ))
    # Re-create so `info` is read back from the prepared directory.
    builder = MixerDigits(data_dir=data_dir)
  return builder
