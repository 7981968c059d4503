"""tf.data input pipelines: TFDS datasets by name and `folder:/path` image folders.

Training order, the same on any topology: the examples of the training split are
visited epoch after epoch, each epoch in a permutation drawn from (config.seed,
epoch) (`tf.random.experimental.index_shuffle`, computed per position, never
materialised). Global batch s is positions s*G .. (s+1)*G - 1 of that stream (G =
config.batch_size) and process p reads its rows p*b .. (p+1)*b - 1 (b = G / process
count), which is also how `sharding.global_batch` lays the rows onto the devices. So
the batch the model sees at step s depends on (seed, s) alone: 1 process x N devices,
N processes x 1 device and any mix train on the same data, and the whole input
state of a run is its step. Host augmentation randomness is keyed by (seed, example
index, epoch); with config.randaugment_on="device" flip and RandAugment run in the
train step instead (keyed by seed, step and position: steps.py). Batches hold uint8
images; the steps scale them to [-1, 1] on the device. Examples are looked up by index (random access: image folders by
path, TFDS splits through datasets/records.py or in memory with config.cache_train).
Images arrive encoded and are decoded here, so that the Inception crop can decode
only the cropped window of a JPEG.

Evaluation visits every example exactly once: each process reads its own contiguous
shard (`tfds.even_splits`, or every n-th file of a folder) and pads it with masked
examples up to the same number of batches (computed from the split sizes, known to
all processes without communication).
"""

import contextlib
import dataclasses
import fcntl
import math
import os
import pathlib
import socket
import time
from typing import List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax import augment
from mixer_jax import datasets
from mixer_jax import errors
from mixer_jax.datasets import decode
from mixer_jax.datasets import folder
from mixer_jax.datasets import records

FOLDER_PREFIX = "folder:"
# Batches each dataset prepares ahead of the train/eval loop.
PREFETCH_BATCHES = 2
# How long a process waits for another one preparing the same dataset (ImageNet from
# its tar files takes hours).
PREPARE_TIMEOUT_S = 6 * 3600


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

  def __init__(self, name: str, data_dir: str = "", manual_dir: str = "",
               prepare_timeout_s: float = PREPARE_TIMEOUT_S):
    self.name = name
    self._data_dir = data_dir or None
    self.builder = self._builder()
    if not self.builder.is_prepared():
      # One process prepares; the others (sharing the data dir or not) wait for it.
      with prepare_lock(os.path.dirname(self.builder.data_dir), prepare_timeout_s):
        self.builder = self._builder()
        if not self.builder.is_prepared():
          datasets.prepare(self.builder, name, manual_dir)
    features = self.builder.info.features
    # imagenet2012_real calls its single label `original_label` (next to `real_label`).
    self.label_key = "original_label" if "label" not in features else "label"
    if "image" not in features or self.label_key not in features:
      raise errors.DataError(f"TFDS dataset {name!r} has features {sorted(features.keys())}; "
                      "an image classification dataset with 'image' and 'label' is required.")
    label = features[self.label_key]
    self.class_names = list(label.names) if hasattr(label, "names") else None
    self.num_classes = int(label.num_classes)
    self.has_real_labels = "real_label" in features

  def _builder(self):
    try:
      return datasets.builder(self.name, self._data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise errors.DataError(
          f"Unknown TFDS dataset {self.name!r} ({type(e).__name__}); use a TFDS name such as "
          "imagenet2012 or cifar10, or folder:/path/to/images.") from None

  @property
  def split_names(self):
    return list(self.builder.info.splits.keys())

  def split_size(self, split: str) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except Exception as e:
      raise errors.DataError(f"Dataset {self.name} has no split {split!r} ({e}); available: "
                      f"{', '.join(self.builder.info.splits.keys())}.") from None

  def process_split(self, split: str, index: int, count: int) -> str:
    return tfds.even_splits(split, n=count, drop_remainder=False)[index]

  def read(self, split: str, index: int, count: int) -> tf.data.Dataset:
    sub = self.process_split(split, index, count)
    ds = self.builder.as_dataset(
        split=sub, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=False))
    keep = {"image": "image", "label": self.label_key}
    if self.has_real_labels:
      keep["real_label"] = "real_label"
    return ds.map(lambda ex: {k: ex[v] for k, v in keep.items()})

  def local_size(self, split: str, index: int, count: int) -> int:
    return self.split_size(self.process_split(split, index, count))

  def image_shape(self, split: str) -> Optional[Tuple[int, int]]:
    """(height, width) of every image if the dataset declares one fixed size, else None."""
    del split
    shape = tuple(self.builder.info.features["image"].shape or ())
    return shape[:2] if len(shape) == 3 and None not in shape[:2] else None

  def split_labels(self, split: str) -> Optional[np.ndarray]:
    """None: a TFDS split's labels are known only by reading all of it."""
    del split
    return None

  def examples(self, split: str, in_memory: bool) -> "Examples":
    """Random access to the split's {image (encoded), label} by example index."""
    self.split_size(split)  # An unknown split is one sentence.
    if self.builder.info.file_format.value != "tfrecord":
      raise errors.DataError(
          f"TFDS dataset {self.name} is prepared as {self.builder.info.file_format.value}; "
          "training reads TFRecord files by example index, so prepare it with the default "
          "file format (`tfds build --file_format=tfrecord`).")
    sequence = records.TfrecordExamples(self.builder, split,
                                        {"image": "image", "label": self.label_key})
    if not in_memory:
      return PythonExamples(sequence)
    examples = InMemoryExamples.read(sequence)
    sequence.close()  # Its file descriptors; the examples are in memory now.
    return examples


class _FolderSource:
  """`folder:/path`: class-per-subfolder images (see datasets/folder.py)."""

  def __init__(self, root: str, skip_corrupt: bool):
    self.name = FOLDER_PREFIX + root
    self.source = folder.FolderSource(root, skip_corrupt=skip_corrupt)
    self.class_names = list(self.source.class_names)
    self.num_classes = self.source.num_classes
    self.has_real_labels = False

  def split_size(self, split: str) -> int:
    return self.source.num_examples(split)

  @property
  def split_names(self):
    return list(self.source.split_names)

  def read(self, split: str, index: int, count: int) -> tf.data.Dataset:
    ds = self.source.as_dataset(split, shard=(index, count))
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  def local_size(self, split: str, index: int, count: int) -> int:
    n = self.split_size(split)
    return len(range(index, n, count))

  def image_shape(self, split: str) -> Optional[Tuple[int, int]]:
    """(height, width) of the split's first image (from its header), the size the
    folder's images are taken to share; None if it has none or PIL cannot tell."""
    items = self.source.split(split)
    if not items:
      return None
    with open(items[0][0], "rb") as f:
      size = decode.pixel_size(f.read())
    return None if size is None else (size[1], size[0])

  def split_labels(self, split: str) -> Optional[np.ndarray]:
    return np.asarray([label for _, label in self.source.split(split)], np.int64)

  def examples(self, split: str, in_memory: bool) -> "Examples":
    items = self.source.split(split)
    paths = [p for p, _ in items]
    labels = np.asarray([label for _, label in items], np.int64)
    if in_memory:
      return InMemoryExamples([pathlib.Path(p).read_bytes() for p in paths], labels)
    return FileExamples(paths, labels)


# ------------------------------------------------------- examples by index
class Examples:
  """A split's examples by index: `len()` and `lookup(index)` inside tf.data."""

  def __len__(self) -> int:
    raise NotImplementedError

  def lookup(self, index: tf.Tensor) -> dict:
    """{'image': encoded bytes, 'label': int64} of example `index` (a scalar tensor)."""
    raise NotImplementedError


class InMemoryExamples(Examples):
  """Encoded images held in memory (config.cache_train, small datasets)."""

  def __init__(self, images: List[bytes], labels: np.ndarray):
    self._images = tf.constant(images, tf.string)
    self._labels = tf.constant(labels, tf.int64)

  @classmethod
  def read(cls, sequence):
    rows = [sequence[i] for i in range(len(sequence))]
    return cls([r["image"] for r in rows], np.asarray([r["label"] for r in rows], np.int64))

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def lookup(self, index):
    return {"image": tf.gather(self._images, index), "label": tf.gather(self._labels, index)}


class FileExamples(Examples):
  """One encoded image file per example (image folders)."""

  def __init__(self, paths: List[str], labels: np.ndarray):
    self._paths = tf.constant(paths, tf.string)
    self._labels = tf.constant(labels, tf.int64)

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def lookup(self, index):
    return {"image": tf.io.read_file(tf.gather(self._paths, index)),
            "label": tf.gather(self._labels, index)}


class PythonExamples(Examples):
  """A Python sequence of {'image', 'label'} (datasets/records.py), read in tf.data."""

  def __init__(self, sequence):
    self._sequence = sequence

  def __len__(self) -> int:
    return len(self._sequence)

  def lookup(self, index):
    def read(i):
      row = self._sequence[int(i)]
      return row["image"], row["label"]
    image, label = tf.py_function(read, [index], (tf.string, tf.int64))
    image.set_shape([])
    label.set_shape([])
    return {"image": image, "label": label}


@contextlib.contextmanager
def prepare_lock(directory: str, timeout_s: float):
  """Holds an exclusive lock on `directory`/.prepare.lock (waiting up to timeout_s).

  A lock of a process that died is released by the kernel, so the next process
  takes it over. The holder's host and pid are in the file, for the message.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, ".prepare.lock")
  with open(path, "a+") as f:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          f.seek(0)
          holder = f.read().strip() or "another process"
          raise errors.DataError(
              f"Waited {timeout_s:.0f} s for {holder} to prepare the dataset in {directory}; "
              f"if no such process runs, delete {path} and run again.") from None
        time.sleep(0.2)
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def get_source(config):
  if config.dataset.startswith(FOLDER_PREFIX):
    return _FolderSource(config.dataset[len(FOLDER_PREFIX):], config.skip_corrupt_images)
  return _TfdsSource(config.dataset, config.data_dir, config.get("manual_dir", ""))


def resolve_splits(config, source) -> None:
  """Fills an empty config.train_split / eval_split from the dataset's own splits:
  train, and validation if it has one, else test; a dataset with a train split alone
  (a folder of class folders) holds out its last 10% (`train[:90%]`, `train[90%:]`,
  the same classes in proportion). Runs before the run record is checked, so the
  record holds the splits used."""
  if config.train_split and config.eval_split:
    return
  names = source.split_names
  if "train" not in names:
    raise errors.DataError(
        f"Dataset {source.name} has no train split (it has {', '.join(names)}); set "
        "--config.train_split and --config.eval_split.")
  held_out = next((s for s in ("validation", "test") if s in names), None)
  if held_out is None:  # One split: hold out its last 10% unless a train split is named.
    if config.train_split:
      raise errors.DataError(
          f"Dataset {source.name} has only a train split, so config.eval_split cannot be "
          f"chosen beside config.train_split={config.train_split!r}; set "
          "--config.eval_split (e.g. train[90%:] with train_split train[:90%]).")
    config.train_split, held_out = "train[:90%]", "train[90%:]"
  config.train_split = config.train_split or "train"
  config.eval_split = config.eval_split or held_out
  logging.info("Splits of %s: training on %s, evaluating on %s.", source.name,
               config.train_split, config.eval_split)


def dataset_info(source, splits) -> DatasetInfo:
  sizes = {s: source.split_size(s) for s in splits}
  for split, n in sizes.items():
    if n == 0:
      raise errors.DataError(f"Split {split!r} of dataset {source.name} is empty; choose a split "
                      "with examples.")
  return DatasetInfo(source.name, source.num_classes, source.class_names, sizes,
                     source.has_real_labels)


def describe_splits(source, info: DatasetInfo, config) -> None:
  """Logs each split's image and class count; refuses a training split of one class.

  The classes present are counted where the labels are known without reading the
  images (image folders); otherwise the dataset's class count is logged as such.
  """
  for role, split in (("train", config.train_split), ("eval", config.eval_split)):
    labels = source.split_labels(split)
    present = info.num_classes if labels is None else len(np.unique(labels))
    if labels is None:
      note = " (the dataset's count; the classes present are not counted without reading)"
    else:
      note = f" (of {info.num_classes})" if present < info.num_classes else ""
    logging.info("%s split %s: %d images, %d class%s%s.", role, split,
                 info.num_examples[split], present, "" if present == 1 else "es", note)
    if role == "train" and present == 1:
      if info.num_classes > 1:
        fix = "use a split (or a larger slice) that holds images of at least two classes"
      elif info.name.startswith(FOLDER_PREFIX):
        fix = "add a subfolder of images for each other class"
      else:
        fix = "use a dataset of at least two classes"
      raise errors.DataError(f"Training split {split!r} of dataset {info.name} holds images of "
                             f"only one class, from which a classifier learns nothing; {fix}.")


def check_image_size(source, config) -> None:
  """train_crop "pad" and "none" take the training images as they are (no resize): a
  dataset of another fixed size is refused here, before anything is compiled, rather
  than by tf.ensure_shape inside the first batch."""
  if config.train_crop not in ("pad", "none"):
    return
  shape = source.image_shape(config.train_split)
  size = config.image_size
  if shape is None or tuple(shape) == (size, size):
    return
  height, width = shape
  same = f"--config.image_size={height} or " if height == width else ""
  raise errors.DataError(
      f"config.image_size={size} but dataset {source.name} has {height} x {width} images, "
      f"which config.train_crop={config.train_crop!r} uses as they are (no resize); use "
      f"{same}--config.train_crop=resize (or inception) to resize them.")


# ----------------------------------------------------------------- preprocessing
def _to_model_range(image):
  """The [-1, 1] scaling on the host: the path before uint8 went to the device, kept for
  tools/benchmark.py's "before" figure (the steps scale on the device)."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def augments_on_host(config) -> bool:
  """Whether flip and RandAugment run here (config.randaugment_on "host", or absent)
  rather than in the train step ("device"); "auto" must be resolved first
  (state.resolve_randaugment_on), so that the step and the pipeline agree."""
  place = getattr(config, "randaugment_on", "host")
  if place not in ("host", "device"):
    raise ValueError(f"config.randaugment_on={place!r} must be resolved to 'host' or "
                     "'device' (state.resolve_randaugment_on) before the input pipeline "
                     "is built.")
  return place == "host"


def _check_label(label, num_classes):
  label = tf.cast(label, tf.int32)
  tf.debugging.assert_less(label, num_classes, message="label out of range")
  tf.debugging.assert_non_negative(label, message="label out of range")
  return label


def preprocess_train(example, seed, config, num_classes, host_scaling: bool = False):
  """Decode -> crop -> resize [-> flip -> RandAugment]: uint8 images.

  Flip and RandAugment run here only with randaugment_on="host" (the train step does
  them otherwise); the [-1, 1] scaling is the train step's (`host_scaling`: here,
  float32 out, the former path that tools/benchmark.py measures).
  config.train_crop is one of state.TRAIN_CROPS (state.validate_config checks it)."""
  crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  size = config.image_size
  if config.train_crop == "inception":
    image = decode.resize(augment.decode_and_inception_crop(example["image"], crop_seed), size)
  elif config.train_crop == "resize":
    image = decode.resize(decode.decode_rgb(example["image"]), size)
  else:  # "pad" or "none"
    # Images already at image_size (the 8x8 digits, Fashion-MNIST): decode, and with
    # "pad" shift by up to train_crop_padding pixels.
    image = tf.ensure_shape(decode.decode_rgb(example["image"]), [size, size, 3])
    if config.train_crop == "pad":
      image = augment.pad_and_crop(image, crop_seed, config.train_crop_padding)
  if augments_on_host(config):
    if config.train_flip:
      image = augment.random_flip(image, flip_seed)
    if config.randaugment_layers > 0:
      image = augment.randaugment(image, ra_seed, num_layers=config.randaugment_layers,
                                  magnitude=config.randaugment_magnitude)
  return {"image": _to_model_range(image) if host_scaling else image,
          "label": _check_label(example["label"], num_classes)}


def preprocess_eval(example, config, num_classes):
  """Decode -> resize (and crop): uint8 images, scaled by the eval step on the device.
  config.eval_preprocess is one of state.EVAL_PREPROCESSES (validate_config checks it)."""
  image = decode.decode_rgb(example["image"])
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
  else:  # "resize"
    image = decode.resize(image, size)
  out = {"image": image, "label": _check_label(example["label"], num_classes),
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


def global_positions(step: tf.Tensor, row: tf.Tensor, *, global_batch: int,
                     local_batch: int, process_index: int) -> tf.Tensor:
  """Position in the training stream of `row` of this process's part of batch `step`."""
  return step * global_batch + process_index * local_batch + row


def example_at(position: tf.Tensor, num_examples: int, seed: int):
  """(example index, epoch) at a position of the training stream."""
  epoch = position // num_examples
  index = tf.random.experimental.index_shuffle(
      position % num_examples, tf.stack([tf.constant(seed, tf.int64), epoch]),
      max_index=num_examples - 1)
  return index, epoch


def train_dataset(source, config, local_batch_size: int, num_classes: int,
                  process_index: int, process_count: int,
                  start_step: int = 0, host_scaling: bool = False) -> tf.data.Dataset:
  """This process's rows of global batches start_step, start_step + 1, ... (endless).

  Elements: {'image': uint8 [b,H,W,3], 'label': i32 [b]} (`host_scaling`: f32 in
  [-1, 1], see preprocess_train); see the module docstring for the order.
  """
  examples = source.examples(config.train_split, config.cache_train)
  n = len(examples)
  b, g = local_batch_size, local_batch_size * process_count

  def load(k):
    position = global_positions(k // b, k % b, global_batch=g, local_batch=b,
                                process_index=process_index)
    index, epoch = example_at(position, n, config.seed)
    seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(config.seed, tf.int64), index]), epoch)
    return preprocess_train(examples.lookup(index), seed, config, num_classes, host_scaling)

  # k counts this process's rows from the start of the run.
  ds = tf.data.Dataset.range(start_step * b, np.iinfo(np.int64).max)
  ds = ds.map(load, num_parallel_calls=os.cpu_count() or 1, deterministic=True)
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


def to_numpy(batch) -> dict:
  return {k: np.asarray(v) for k, v in batch.items()}
