"""The training spine: data, sharded train step, eval counts, checkpoints, resume, errors."""

import glob
import json
import os

import numpy as np
import pytest

from conftest import config_flags, run_main, tiny_config
from mixer_jax import checkpoint
from mixer_jax import input_pipeline
from mixer_jax import train


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  result = train.train_and_evaluate(tiny_config(data_dir, fewshot_every_steps=4), workdir)
  return workdir, result


def test_training_writes_metrics_events_and_checkpoints(trained):
  workdir, result = trained
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4]
  for key in ("train/loss", "train/learning_rate", "train/accuracy", "train/grad_norm"):
    assert all(np.isfinite(r[key]) for r in train_rows)
  eval_row = [r for r in rows if "eval/accuracy" in r][-1]
  assert eval_row["step"] == 4 and eval_row["eval/num_examples"] == 355
  assert {"eval/top5", "eval/loss"} <= set(eval_row)
  assert result["num_examples"] == 355
  fewshot_row = [r for r in rows if "fewshot/5shot" in r][-1]
  assert fewshot_row["step"] == 4 and 0.0 <= fewshot_row["fewshot/10shot"] <= 1.0
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert checkpoint.read_model_file(workdir)["num_classes"] == 10


def test_rerun_resumes_and_raising_steps_continues(trained, data_dir):
  workdir, _ = trained
  before = read_metrics(workdir)
  # Same command again: nothing left to do, no step repeated.
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert read_metrics(workdir) == before
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6), workdir)
  steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
  assert steps == [2, 4, 6]
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_eval_counts_every_example_once_with_a_remainder_batch(data_dir):
  config = tiny_config(data_dir, eval_batch_size=48)  # 355 = 7 * 48 + 19.
  source = input_pipeline.get_source(config)
  for count in (1, 2, 3):
    seen, batches = [], set()
    for index in range(count):
      ds, n = input_pipeline.eval_dataset(source, config, "test", 48 // count if 48 % count == 0
                                          else 16, 10, index, count)
      batches.add(n)
      for batch in ds.as_numpy_iterator():
        seen.append(float(batch["mask"].sum()))
    assert len(batches) == 1  # Same number of batches on every process.
    assert sum(seen) == 355


def test_train_pipeline_shapes_ranges_and_process_shards(data_dir):
  config = tiny_config(data_dir)
  source = input_pipeline.get_source(config)
  batch = next(iter(input_pipeline.train_dataset(source, config, 16, 10, 0, 1)))
  assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype.name == "float32"
  assert -1.0 <= float(batch["image"].numpy().min()) and float(batch["image"].numpy().max()) <= 1.0
  assert batch["label"].shape == (16,) and batch["label"].numpy().max() < 10
  # Each process reads its own part of the split; together exactly the split.
  images = []
  for index in range(2):
    ds = source.read("train", index, 2)
    images.append({bytes(ex["image"]) for ex in ds.as_numpy_iterator()})
  assert len(images[0]) + len(images[1]) == len(images[0] | images[1])
  assert sum(1 for _ in source.read("train", 0, 1)) == 1442


def test_batch_is_a_global_jax_array(data_dir):
  import jax
  from mixer_jax import sharding
  mesh = sharding.make_mesh()
  local = {"image": np.zeros((4, 8, 8, 3), np.float32), "label": np.arange(4)}
  batch = sharding.global_batch(local, mesh)
  assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (4, 8, 8, 3)


def _first_losses(workdir):
  return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def test_one_device_and_eight_devices_give_the_same_loss(data_dir, tmp_path):
  flags = config_flags(data_dir, log_every_steps=1, eval_batch_size=48)
  one = run_main(flags + [f"--workdir={tmp_path / 'one'}"])
  assert one.returncode == 0, one.stderr[-3000:]
  eight = run_main(flags + [f"--workdir={tmp_path / 'eight'}"],
                   env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert "8 global devices" in eight.stderr
  np.testing.assert_allclose(_first_losses(tmp_path / "one"), _first_losses(tmp_path / "eight"),
                             rtol=2e-5)
  evals = [[r for r in read_metrics(tmp_path / w) if "eval/num_examples" in r][-1]
           for w in ("one", "eight")]
  assert evals[0]["eval/num_examples"] == evals[1]["eval/num_examples"] == 355
  np.testing.assert_allclose(evals[0]["eval/loss"], evals[1]["eval/loss"], rtol=2e-5)


def test_command_line_overrides_and_bad_keys(data_dir, tmp_path):
  bad_key = run_main(config_flags(data_dir) + ["--config.batchsize=8", f"--workdir={tmp_path}"])
  assert bad_key.returncode != 0 and "batchsize" in bad_key.stderr
  bad_type = run_main(config_flags(data_dir, batch_size="many") + [f"--workdir={tmp_path}"])
  assert bad_type.returncode != 0 and "batch_size" in bad_type.stderr
  assert not os.listdir(tmp_path)  # Nothing written.


def test_batch_not_divisible_by_devices_fails_before_compiling(data_dir, tmp_path):
  out = run_main(config_flags(data_dir, batch_size=12) + [f"--workdir={tmp_path / 'w'}"],
                 env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert "config.batch_size=12" in last and "divisible by the 8 data-parallel devices" in last
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides,message", [
    (dict(dataset="no_such_dataset_xyz"), "Unknown TFDS dataset 'no_such_dataset_xyz'"),
    (dict(dataset="cifar10"), "tfds build cifar10"),
    (dict(dataset="imagenet2012"), "ILSVRC2012_img_train.tar"),
    (dict(batch_size=0), "config.batch_size=0 must be a positive number"),
    (dict(learning_rate=-1.0), "config.learning_rate=-1.0 must be zero or positive"),
    (dict(image_size=9), "Image side 9 is not divisible by the patch size 2"),
    (dict(**{"model.variant": "Z/9"}), "Unknown Mixer variant 'Z/9'"),
    (dict(grad_accum_steps=3), "config.grad_accum_steps=3 must be a positive divisor"),
    (dict(num_classes=4), "config.num_classes=4 is smaller than the 10 classes"),
    (dict(loss="hinge"), "config.loss='hinge' is not one of softmax, sigmoid"),
])
def test_config_and_data_errors_are_one_sentence(data_dir, tmp_path, overrides, message):
  config = tiny_config(data_dir, **overrides)
  if overrides.get("dataset") in ("cifar10", "imagenet2012"):
    config.data_dir = str(tmp_path / "empty_tfds")  # Not prepared there.
    os.makedirs(config.data_dir)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unwritable_workdir(data_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(train.WorkdirError, match="is not writable"):
    train.train_and_evaluate(tiny_config(data_dir), str(blocker / "sub"))


def test_workdir_of_a_different_model_is_refused(trained, data_dir):
  workdir, _ = trained
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(train.WorkdirError, match="different model"):
    train.train_and_evaluate(tiny_config(data_dir, **{"model.hidden_dim": 24}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
