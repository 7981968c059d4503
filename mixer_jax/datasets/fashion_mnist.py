"""TFDS builder ``mixer_fashion_mnist``: Fashion-MNIST from local IDX files.

Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747): 28x28 grey images of Zalando
articles, 10 classes, 60,000 train and 10,000 test. Debian's package
``dataset-fashion-mnist`` installs its four IDX files under
``/usr/share/datasets/fashion-mnist/`` (``DEBIAN_DIR``); this builder prepares the
dataset from those files (or from the same four files, gzipped or not, in
``config.manual_dir``) and downloads nothing. TFDS's own ``fashion_mnist`` builder
would download, and rejects the Debian files on checksum (their gzip bytes differ
from the upstream download; the images and labels are the same).

Importing this module registers the builder; ``config.dataset="mixer_fashion_mnist"``
then trains, evaluates and fine-tunes on it like any TFDS dataset.

Features
--------
``image``: ``tfds.features.Image(shape=(28, 28, 1))``, the IDX bytes unchanged (0 is
  background). Decoding with 3 channels (the input pipeline's ``tf.io.decode_image``,
  predict's ``PIL convert("RGB")``) repeats the grey value in each channel.
``label``: ``tfds.features.ClassLabel`` with the dataset's class names (``CLASSES``).
``id``: int64, the example's index in its IDX file; it is also the TFDS key, so the
  record order inside each split is the files' order.

Splits: ``train`` (train-*-ubyte) and ``test`` (t10k-*-ubyte), all examples.

IDX format (LeCun's MNIST page): a big-endian header, magic ``0x00000800 | ndim``
with type byte 0x08 (unsigned byte), then ``ndim`` uint32 sizes, then the bytes of
the array in C order. Every file is checked (magic, sizes, length, label range,
image/label count agreement) and a problem is one sentence naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

from mixer_jax import errors

NAME = "mixer_fashion_mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
PACKAGE_HINT = ("install Debian's dataset-fashion-mnist (`apt-get install "
                f"dataset-fashion-mnist`, files in {DEBIAN_DIR}) or put the four IDX files "
                "in config.manual_dir")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
IMAGE_SIZE = 28
# split -> (images file, labels file), without the optional ".gz".
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_UBYTE = 0x08


def find_file(directory: str, stem: str) -> str:
  """Path of `stem` or `stem.gz` in `directory`; one sentence if neither is there."""
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise errors.DataError(f"Fashion-MNIST file {stem}[.gz] is not in {directory}; "
                         f"{PACKAGE_HINT}.")


def read_idx(path: str) -> np.ndarray:
  """The uint8 array of an IDX file (gzipped or not), its header checked."""
  try:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise errors.DataError(f"Fashion-MNIST file {path} cannot be read ({type(e).__name__}: "
                           f"{e}); {PACKAGE_HINT}, complete and unmodified.") from None
  if len(data) < 4:
    raise errors.DataError(f"Fashion-MNIST file {path} has {len(data)} bytes, too few for "
                           f"an IDX header; {PACKAGE_HINT}, complete and unmodified.")
  zero, dtype, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype != _UBYTE or ndim not in (1, 3):
    raise errors.DataError(f"Fashion-MNIST file {path} is not an unsigned-byte IDX file "
                           f"(magic {data[:4].hex()}, expected 00000801 or 00000803); "
                           f"{PACKAGE_HINT}, complete and unmodified.")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise errors.DataError(f"Fashion-MNIST file {path} ends inside its header; "
                           f"{PACKAGE_HINT}, complete and unmodified.")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = header + int(np.prod(shape))
  if len(data) != expected:
    raise errors.DataError(f"Fashion-MNIST file {path} holds {len(data)} bytes but its "
                           f"header {list(shape)} needs {expected}; {PACKAGE_HINT}, "
                           "complete and unmodified.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_split(directory: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int64 [N]) of a split, checked."""
  image_stem, label_stem = FILES[split]
  image_path = find_file(directory, image_stem)
  label_path = find_file(directory, label_stem)
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise errors.DataError(f"Fashion-MNIST file {image_path} holds arrays of shape "
                           f"{list(images.shape)}, not [N, 28, 28] images; {PACKAGE_HINT}.")
  if labels.ndim != 1:
    raise errors.DataError(f"Fashion-MNIST file {label_path} holds an array of shape "
                           f"{list(labels.shape)}, not a list of labels; {PACKAGE_HINT}.")
  if len(images) != len(labels):
    raise errors.DataError(f"Fashion-MNIST files {image_path} and {label_path} hold "
                           f"{len(images)} images but {len(labels)} labels; {PACKAGE_HINT}, "
                           "both from the same release.")
  if labels.size and labels.max() >= len(CLASSES):
    raise errors.DataError(f"Fashion-MNIST file {label_path} holds label {int(labels.max())}, "
                           f"but the dataset has {len(CLASSES)} classes (0-9); {PACKAGE_HINT}.")
  return images, labels.astype(np.int64)


def check_files(directory: str) -> None:
  """One sentence if any of the four files is missing (before TFDS starts writing)."""
  for stems in FILES.values():
    for stem in stems:
      find_file(directory, stem)


class MixerFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local IDX files (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"The four IDX files of Fashion-MNIST, gzipped or not; {PACKAGE_HINT}.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Fashion-MNIST: 28x28 grey images of 10 kinds of Zalando articles, "
                     "prepared from local IDX files."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASSES)),
            "id": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation=("@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset "
                  "for Benchmarking Machine Learning Algorithms}, author={Xiao, Han and "
                  "Rasul, Kashif and Vollgraf, Roland}, journal={arXiv:1708.07747}, "
                  "year={2017}}"),
    )

  def _split_generators(self, dl_manager):
    directory = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(*load_split(directory, split)) for split in FILES}

  def _generate_examples(self, images, labels) -> Iterator[Tuple[int, Dict]]:
    for i in range(len(labels)):
      yield i, {"image": images[i][..., None], "label": int(labels[i]), "id": i}


def prepare(data_dir: str, manual_dir: str = "") -> MixerFashionMnist:
  """Prepares the dataset under `data_dir` from `manual_dir` (default DEBIAN_DIR) if
  needed and returns the builder. Offline; a prepared dataset is reused."""
  builder = MixerFashionMnist(data_dir=os.fspath(data_dir) if data_dir else None)
  if not builder.is_prepared():
    download_and_prepare(builder, manual_dir)
  return builder


def download_and_prepare(builder: MixerFashionMnist, manual_dir: str = "") -> None:
  """Prepares `builder` in place from the IDX files in `manual_dir` (default
  DEBIAN_DIR); a missing file is one sentence before TFDS writes anything."""
  manual_dir = manual_dir or DEBIAN_DIR
  check_files(manual_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
