"""input_pipeline.py: the global training order (the same batches on any topology, the
step as the whole resume state), examples by index, the prepare lock; datasets/records.py."""

import io
import multiprocessing
import os
import time
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mixer_jax import errors
from mixer_jax import input_pipeline
from mixer_jax.datasets import records

N = 13  # Examples: a prime, so batches straddle the epoch boundaries.
SIZE = 8


def _png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class _Source:
  """Example i: an image of constant value 10 * i, label i (so a label names its example)."""

  def examples(self, split, in_memory):
    del split, in_memory
    return input_pipeline.InMemoryExamples([_png(10 * i) for i in range(N)],
                                           np.arange(N, dtype=np.int64))


def _config(**overrides):
  c = dict(seed=3, train_split="train", cache_train=True, image_size=SIZE, train_crop="none",
           train_flip=True, randaugment_layers=0, randaugment_magnitude=0)
  c.update(overrides)
  return types.SimpleNamespace(**c)


def _global_batches(config, global_batch, process_count, steps, start_step=0):
  """Every process's batches of `steps` steps, rows concatenated in process order."""
  local = global_batch // process_count
  per_process = []
  for p in range(process_count):
    ds = input_pipeline.train_dataset(_Source(), config, local, N, p, process_count,
                                      start_step)
    per_process.append(list(ds.take(steps).as_numpy_iterator()))
  return [{k: np.concatenate([per_process[p][s][k] for p in range(process_count)])
           for k in ("image", "label")} for s in range(steps)]


def test_global_batch_is_the_same_for_any_process_count():
  config = _config()
  one = _global_batches(config, 4, 1, steps=7)
  for count in (2, 4):
    other = _global_batches(config, 4, count, steps=7)
    for s, (a, b) in enumerate(zip(one, other)):
      np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"step {s}")
      # The flip is keyed by (seed, example, epoch), not by where the example is read.
      np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"step {s}")


def test_resume_at_a_step_continues_the_same_stream():
  config = _config()
  whole = _global_batches(config, 4, 2, steps=9)
  resumed = _global_batches(config, 4, 1, steps=4, start_step=5)
  for a, b in zip(whole[5:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_every_epoch_is_a_permutation_drawn_from_the_seed():
  labels = np.concatenate([b["label"] for b in _global_batches(_config(), N, 1, steps=3)])
  epochs = labels.reshape(3, N)
  for epoch in epochs:
    assert sorted(epoch) == list(range(N))
  assert len({tuple(e) for e in epochs}) == 3  # Reshuffled every epoch.
  other_seed = np.concatenate(
      [b["label"] for b in _global_batches(_config(seed=4), N, 1, steps=1)])
  assert list(other_seed) != list(epochs[0])
  again = np.concatenate([b["label"] for b in _global_batches(_config(), N, 1, steps=1)])
  assert list(again) == list(epochs[0])


def test_augmentation_differs_between_epochs_of_one_example():
  config = _config(train_crop="resize", randaugment_layers=2, randaugment_magnitude=15)
  batches = _global_batches(config, N, 1, steps=2)
  by_label = [{int(l): img for l, img in zip(b["label"], b["image"])} for b in batches]
  assert any(not np.array_equal(by_label[0][i], by_label[1][i]) for i in range(N))


def test_folder_examples_read_files_by_index(tmp_path):
  paths = []
  for i in range(3):
    path = tmp_path / f"{i}.png"
    path.write_bytes(_png(10 * i))
    paths.append(str(path))
  examples = input_pipeline.FileExamples(paths, np.array([5, 6, 7], np.int64))
  row = examples.lookup(tf.constant(2, tf.int64))
  assert len(examples) == 3 and int(row["label"]) == 7
  assert tf.io.decode_png(row["image"]).numpy().max() == 20


# ------------------------------------------------------------ TFRecord by index
def _write_records(path, payloads):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for payload in payloads:
      writer.write(payload)


def test_record_offsets_find_every_record(tmp_path):
  payloads = [b"x" * n for n in (0, 1, 100, 7)]
  path = tmp_path / "a.tfrecord"
  _write_records(path, payloads)
  data = path.read_bytes()
  offsets = records.record_offsets(str(path))
  assert [data[o:o + n] for o, n in offsets] == payloads


def test_truncated_record_file_is_one_sentence(tmp_path):
  path = tmp_path / "a.tfrecord"
  _write_records(path, [b"abc" * 50, b"def" * 50])
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(errors.DataError, match="a.tfrecord is truncated.*prepare the dataset"):
    records.record_offsets(str(path))


def test_tfds_examples_by_index_equal_the_sequential_read(data_dir):
  import tensorflow_datasets as tfds
  builder = tfds.builder("mixer_digits", data_dir=data_dir)
  split = "train[10:30]"
  sequential = list(builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
                    .as_numpy_iterator())
  examples = records.TfrecordExamples(builder, split, {"image": "image", "label": "label"})
  assert len(examples) == 20
  for i in (0, 7, 19):
    assert examples[i]["image"] == sequential[i]["image"]
    assert examples[i]["label"] == sequential[i]["label"]
  examples.close()


def test_tfds_source_streams_from_files_or_memory_alike(data_dir):
  config = types.SimpleNamespace(dataset="mixer_digits", data_dir=data_dir, manual_dir="")
  source = input_pipeline._TfdsSource(config.dataset, data_dir)
  on_disk, in_memory = source.examples("train", False), source.examples("train", True)
  assert len(on_disk) == len(in_memory) == 1442
  for i in (0, 1441):
    a, b = on_disk.lookup(tf.constant(i, tf.int64)), in_memory.lookup(tf.constant(i, tf.int64))
    assert a["image"].numpy() == b["image"].numpy() and int(a["label"]) == int(b["label"])


# ------------------------------------------------------------------ prepare lock
def _hold_lock(directory, seconds, ready):
  with input_pipeline.prepare_lock(directory, timeout_s=5):
    ready.set()
    time.sleep(seconds)


def test_prepare_lock_waits_names_the_holder_and_outlives_a_dead_holder(tmp_path):
  ctx = multiprocessing.get_context("spawn")
  ready = ctx.Event()
  holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), 60, ready))
  holder.start()
  try:
    assert ready.wait(60)
    with pytest.raises(errors.DataError, match=rf"process {holder.pid} on .*prepare the dataset"):
      with input_pipeline.prepare_lock(str(tmp_path), timeout_s=0.5):
        pass
    holder.kill()  # Its lock goes with it.
    holder.join()
    with input_pipeline.prepare_lock(str(tmp_path), timeout_s=5):
      assert f"process {os.getpid()} " in (tmp_path / ".prepare.lock").read_text()
  finally:
    if holder.is_alive():
      holder.kill()


def test_batches_are_uint8_and_device_augmentation_leaves_the_host_images_plain():
  plain = _global_batches(_config(train_flip=False), 4, 1, steps=3)
  for place in ("host", "device"):
    config = _config(randaugment_on=place, randaugment_layers=2, randaugment_magnitude=15)
    got = _global_batches(config, 4, 1, steps=3)
    assert all(b["image"].dtype == np.uint8 for b in got)
    same = all(np.array_equal(a["image"], b["image"]) for a, b in zip(got, plain))
    # Constant images: flip is invisible, RandAugment's colour ops are not.
    assert same == (place == "device"), place
  with pytest.raises(ValueError, match=r"randaugment_on='auto' must be resolved"):
    _global_batches(_config(randaugment_on="auto"), 4, 1, steps=1)


def test_folder_dataset_batches_are_the_same_for_any_process_count(tmp_path):
  for i in range(N):
    folder = tmp_path / "train" / f"class{i % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i:02d}.png").write_bytes(_png(10 * i))
  config = _config(cache_train=False, dataset=f"folder:{tmp_path}", skip_corrupt_images=False)
  source = input_pipeline.get_source(types.SimpleNamespace(**vars(config), data_dir=""))

  def batches(count, steps=5):
    streams = [list(input_pipeline.train_dataset(source, config, 4 // count, 3, p, count)
                    .take(steps).as_numpy_iterator()) for p in range(count)]
    return [np.concatenate([streams[p][s]["image"] for p in range(count)])
            for s in range(steps)]

  for a, b in zip(batches(1), batches(2)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ describe_splits
def _folder(root, layout):
  """{split dir (or "" for flat): {class: image count}} of PNGs under root."""
  for split, classes in layout.items():
    for cls, n in classes.items():
      (root / split / cls).mkdir(parents=True, exist_ok=True)
      for i in range(n):
        (root / split / cls / f"{i}.png").write_bytes(_png(i))
  return input_pipeline._FolderSource(str(root), False)


def _describe(source, train, evaluation):
  info = input_pipeline.dataset_info(source, [train, evaluation])
  input_pipeline.describe_splits(source, info, _config(train_split=train, eval_split=evaluation))


def test_describe_splits_logs_images_and_classes_present(tmp_path, caplog):
  caplog.set_level("INFO")
  folder = _folder(tmp_path, {"train": {"a": 3, "b": 2}, "validation": {"a": 2}})
  _describe(folder, "train", "validation")
  assert "train split train: 5 images, 2 classes." in caplog.text
  assert "eval split validation: 2 images, 1 class (of 2)." in caplog.text
  # TFDS: the labels are not read; the dataset's class count is logged as such.
  tfds_like = types.SimpleNamespace(split_labels=lambda split: None)
  info = input_pipeline.DatasetInfo("cifar10", 10, None, {"train": 50000, "test": 10000})
  input_pipeline.describe_splits(tfds_like, info, _config(eval_split="test"))
  assert "eval split test: 10000 images, 10 classes (the dataset's count;" in caplog.text


def test_training_on_one_class_is_refused(tmp_path):
  with pytest.raises(errors.DataError, match=r"^Training split 'train' of dataset folder:.*"
                     r"only one class.*add a subfolder of images for each other class\.$"):
    _describe(_folder(tmp_path / "one", {"": {"a": 2}}), "train", "train")
  two = _folder(tmp_path / "two", {"": {"a": 2, "b": 2}})
  with pytest.raises(errors.DataError, match=r"'train\[:1\]'.*a larger slice"):
    _describe(two, "train[:1]", "train")


def test_resume_with_moved_split_boundaries_is_logged_with_both_counts(tmp_path, caplog):
  from mixer_jax import run_record, workdir
  record = dict(model={"hidden_dim": 8}, num_classes=2, image_size=8,
                split_sizes={"train[:75%]": 60, "train[75%:]": 20})
  run_record.write_model_file(str(tmp_path), record)
  workdir.check_same_model(str(tmp_path), record)
  assert "Split" not in caplog.text
  moved = dict(record, split_sizes={"train[:75%]": 63, "train[75%:]": 21})
  workdir.check_same_model(str(tmp_path), moved)
  assert (f"Split train[:75%] held 60 images when workdir {tmp_path} was last started and "
          "holds 63 now (files were added or removed)") in caplog.text
  assert "Split train[75%:] held 20 images" in caplog.text


def test_fixed_size_images_are_checked_against_image_size(tmp_path):
  source = _folder(tmp_path, {"": {"a": 2, "b": 2}})
  assert source.image_shape("train") == (SIZE, SIZE)
  input_pipeline.check_image_size(source, _config())  # 8 px images at 8 px.
  input_pipeline.check_image_size(source, _config(image_size=16, train_crop="resize"))
  with pytest.raises(errors.DataError, match=r"config.image_size=16 but dataset folder:.* has "
                     r"8 x 8 images, which config.train_crop='pad' uses as they are"):
    input_pipeline.check_image_size(source, _config(image_size=16, train_crop="pad"))
