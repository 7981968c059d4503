"""tf.data input pipelines: TFDS datasets by name and `folder:/path` image folders.

Each process reads only its own shard (`tfds.even_splits` over processes, or every
n-th file of a folder). Images arrive encoded and are decoded here, so that the
Inception crop can decode only the cropped window of a JPEG.

Determinism: the training stream is a pure function of (seed, process, example
index): shuffling is seeded and every random augmentation is a stateless op keyed
by the example's position in the stream. The iterator position itself is saved
with each checkpoint (`save_iterator` / `restore_iterator`), so a resumed run sees
exactly the batches it would have seen.

Evaluation visits every example exactly once: each process pads its shard with
masked examples up to the same number of batches (computed from the split sizes,
known to all processes without communication).
"""

import dataclasses
import math
import os
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from mixer_jax import augment

FOLDER_PREFIX = "folder:"
# Datasets whose preparation needs no download: built here on first use.
_OFFLINE_BUILDERS = ("mixer_digits",)
# Batches each dataset prepares ahead of the train/eval loop.
PREFETCH_BATCHES = 2
# Datasets prepared by TFDS from files the user downloads into the manual dir.
_MANUAL_DATASETS = {
    "imagenet2012": "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual "
                    "dir (config.manual_dir, default DATA_DIR/downloads/manual)",
}


class DataError(ValueError):
  """A dataset that cannot be read as configured."""


@dataclasses.dataclass
class DatasetInfo:
  name: str
  num_classes: int
  class_names: Optional[List[str]]
  num_examples: dict  # split -> global count.
  has_real_labels: bool = False


# ---------------------------------------------------------------------- sources
class _TfdsSource:
  """A TFDS dataset, prepared in `data_dir`."""

  def __init__(self, name: str, data_dir: str = "", manual_dir: str = ""):
    import tensorflow_datasets as tfds
    from mixer_jax.datasets import digits  # noqa: F401  Registers `mixer_digits`.
    self._tfds = tfds
    self.name = name
    data_dir = data_dir or None
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise DataError(f"Unknown TFDS dataset {name!r} ({type(e).__name__}); use a TFDS name "
                      f"such as imagenet2012 or cifar10, or folder:/path/to/images.") from None
    if not self.builder.is_prepared():
      self._prepare(manual_dir)
    features = self.builder.info.features
    # imagenet2012_real calls its single label `original_label` (next to `real_label`).
    self.label_key = "original_label" if "label" not in features else "label"
    if "image" not in features or self.label_key not in features:
      raise DataError(f"TFDS dataset {name!r} has features {sorted(features.keys())}; "
                      "an image classification dataset with 'image' and 'label' is required.")
    label = features[self.label_key]
    self.class_names = list(label.names) if hasattr(label, "names") else None
    self.num_classes = int(label.num_classes)
    self.has_real_labels = "real_label" in features

  def _prepare(self, manual_dir: str):
    tfds, name = self._tfds, self.name
    where = self.builder.data_dir
    if name in _OFFLINE_BUILDERS:
      self.builder.download_and_prepare()
      return
    base = name.split("/")[0].split(":")[0]
    if base in _MANUAL_DATASETS:
      # TFDS's own default: DATA_DIR/downloads/manual; `where` is DATA_DIR/name[/config]/version.
      root = where
      for _ in range(3 if self.builder.builder_config else 2):
        root = os.path.dirname(root)
      manual = manual_dir or os.path.join(root, "downloads", "manual")
      if not os.path.isdir(manual) or not os.listdir(manual):
        raise DataError(f"TFDS dataset {name} is not prepared in {where}; "
                        f"{_MANUAL_DATASETS[base]}, here {manual}, and run again.")
      try:
        self.builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
      except Exception as e:  # Truncated or misnamed tars: TFDS's own errors are deep.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"TFDS could not prepare {name} from the manual dir {manual} "
                        f"({type(e).__name__}: {reason}); {_MANUAL_DATASETS[base]}, "
                        "complete and unmodified.") from e
      return
    raise DataError(f"TFDS dataset {name} is not prepared in {where}; prepare it on a "
                    f"machine with internet (`tfds build {name} --data_dir=DIR`) and point "
                    "config.data_dir at DIR.")

  def split_size(self, split: str) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except Exception as e:
      raise DataError(f"Dataset {self.name} has no split {split!r} ({e}); available: "
                      f"{', '.join(self.builder.info.splits.keys())}.") from None

  def process_split(self, split: str, index: int, count: int) -> str:
    return self._tfds.even_splits(split, n=count, drop_remainder=False)[index]

  def read(self, split: str, index: int, count: int) -> tf.data.Dataset:
    sub = self.process_split(split, index, count)
    ds = self.builder.as_dataset(
        split=sub, shuffle_files=False,
        decoders={"image": self._tfds.decode.SkipDecoding()},
        read_config=self._tfds.ReadConfig(add_tfds_id=False))
    keep = {"image": "image", "label": self.label_key}
    if self.has_real_labels:
      keep["real_label"] = "real_label"
    return ds.map(lambda ex: {k: ex[v] for k, v in keep.items()})

  def local_size(self, split: str, index: int, count: int) -> int:
    return self.split_size(self.process_split(split, index, count))


class _FolderSource:
  """`folder:/path`: class-per-subfolder images (see datasets/folder.py)."""

  def __init__(self, root: str, skip_corrupt: bool):
    from mixer_jax.datasets import folder
    self.name = FOLDER_PREFIX + root
    self.source = folder.FolderSource(root, skip_corrupt=skip_corrupt)
    self.class_names = list(self.source.class_names)
    self.num_classes = self.source.num_classes
    self.has_real_labels = False

  def split_size(self, split: str) -> int:
    return self.source.num_examples(split)

  def read(self, split: str, index: int, count: int) -> tf.data.Dataset:
    ds = self.source.as_dataset(split, shard=(index, count))
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  def local_size(self, split: str, index: int, count: int) -> int:
    n = self.split_size(split)
    return len(range(index, n, count))


def get_source(config):
  if config.dataset.startswith(FOLDER_PREFIX):
    return _FolderSource(config.dataset[len(FOLDER_PREFIX):], config.skip_corrupt_images)
  return _TfdsSource(config.dataset, config.data_dir, config.get("manual_dir", ""))


def dataset_info(source, splits) -> DatasetInfo:
  sizes = {s: source.split_size(s) for s in splits}
  for split, n in sizes.items():
    if n == 0:
      raise DataError(f"Split {split!r} of dataset {source.name} is empty; choose a split "
                      "with examples.")
  return DatasetInfo(source.name, source.num_classes, source.class_names, sizes,
                     source.has_real_labels)


# ----------------------------------------------------------------- preprocessing
def _decode(encoded):
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _resize(image, size):
  image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _to_model_range(image):
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def _check_label(label, num_classes):
  label = tf.cast(label, tf.int32)
  tf.debugging.assert_less(label, num_classes, message="label out of range")
  tf.debugging.assert_non_negative(label, message="label out of range")
  return label


def preprocess_train(example, seed, config, num_classes):
  """Decode -> crop -> resize -> flip -> RandAugment -> [-1, 1]."""
  crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  size = config.image_size
  if config.train_crop == "inception":
    image = _resize(augment.decode_and_inception_crop(example["image"], crop_seed), size)
  elif config.train_crop == "resize":
    image = _resize(_decode(example["image"]), size)
  elif config.train_crop == "none":
    # Images already at image_size (e.g. the 8x8 digits): decode only.
    image = tf.ensure_shape(_decode(example["image"]), [size, size, 3])
  else:
    raise DataError(f"Unknown config.train_crop {config.train_crop!r}; use inception, resize "
                    "or none.")
  if config.train_flip:
    image = augment.random_flip(image, flip_seed)
  if config.randaugment_layers > 0:
    image = augment.randaugment(image, ra_seed, num_layers=config.randaugment_layers,
                                magnitude=config.randaugment_magnitude)
  return {"image": _to_model_range(image),
          "label": _check_label(example["label"], num_classes)}


def preprocess_eval(example, config, num_classes):
  image = _decode(example["image"])
  size = config.image_size
  if config.eval_preprocess == "resize_crop":
    # Shorter side to size / crop_fraction (256 for 224), then the central size x size.
    resize_to = int(round(size / config.eval_crop_fraction))
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_to / tf.reduce_min(shape)
    new_hw = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    image = image[top:top + size, left:left + size]
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image.set_shape([size, size, 3])
  elif config.eval_preprocess == "resize":
    image = _resize(image, size)
  else:
    raise DataError(f"Unknown config.eval_preprocess {config.eval_preprocess!r}; use "
                    "resize_crop or resize.")
  out = {"image": _to_model_range(image), "label": _check_label(example["label"], num_classes),
         "mask": tf.constant(1.0, tf.float32)}
  if "real_label" in example:
    # A sum, not a max: max over an image with no ReaL labels would give -inf (-> NaN).
    multi_hot = tf.minimum(tf.reduce_sum(tf.one_hot(example["real_label"], num_classes), 0), 1.0)
    out["real"] = tf.reshape(multi_hot, [num_classes])
  return out


# --------------------------------------------------------------------- datasets
def _options():
  options = tf.data.Options()
  options.deterministic = True
  cores = max(os.cpu_count() or 1, 1)
  options.threading.private_threadpool_size = cores
  # No autotuning: destroying an autotuned iterator waits for its model thread, which
  # sleeps up to a minute (seen as a ~56 s hang at the end of training). Parallel maps
  # then use every core, which is what autotuning settles on for these pipelines.
  options.autotune.enabled = False
  return options


def train_dataset(source, config, local_batch_size: int, num_classes: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """Endless stream of {'image': f32 [B,H,W,3] in [-1,1], 'label': i32 [B]}."""
  ds = source.read(config.train_split, process_index, process_count)
  if config.cache_train:
    ds = ds.cache()
  ds = ds.repeat()
  ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
  base_seed = tf.constant([config.seed, process_index], tf.int64)

  def with_seed(index, example):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return preprocess_train(example, seed, config, num_classes)

  ds = ds.enumerate().map(with_seed, num_parallel_calls=os.cpu_count() or 1,
                          deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(PREFETCH_BATCHES).with_options(_options())


def eval_dataset(source, config, split: str, local_batch_size: int, num_classes: int,
                 process_index: int, process_count: int) -> Tuple[tf.data.Dataset, int]:
  """Every example of this process's shard once, padded with mask=0 to the same
  number of batches on every process. Returns (dataset, num_batches)."""
  sizes = [source.local_size(split, i, process_count) for i in range(process_count)]
  num_batches = max(1, math.ceil(max(sizes) / local_batch_size))
  local = sizes[process_index]
  ds = source.read(split, process_index, process_count)
  ds = ds.map(lambda ex: preprocess_eval(ex, config, num_classes),
              num_parallel_calls=os.cpu_count() or 1, deterministic=True)
  pad = num_batches * local_batch_size - local
  if pad:
    zero = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(zero).repeat(pad))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(PREFETCH_BATCHES).with_options(_options()), num_batches


# ----------------------------------------------------------- iterator position
def save_iterator(iterator, path: str) -> None:
  """Saves a tf.data iterator's position (and its shuffle buffer) atomically."""
  tmp = f"{path}.tmp"
  tf.io.gfile.makedirs(tmp)
  tf.train.Checkpoint(iterator=iterator).write(os.path.join(tmp, "iterator"))
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)
  tf.io.gfile.rename(tmp, path)


def restore_iterator(iterator, path: str) -> None:
  tf.train.Checkpoint(iterator=iterator).read(os.path.join(path, "iterator")).assert_consumed()


def to_numpy(batch) -> dict:
  return {k: np.asarray(v) for k, v in batch.items()}
