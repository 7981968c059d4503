"""train.py, the training spine: data, sharded train step, eval counts, checkpoints,
resume, preemption, errors; the pre-training recipe (configs/imagenet1k_pretrain.py)
end to end on a generated image folder with every augmentation on (marker `slow`);
fine-tuning (`init_from`) from a tiny released-layout `.npz`, step by step against an
independent computation; and fault injection (marker `faults`): SIGKILL a training
run anywhere, restart it, get the same run.

    bash tests/run.sh -m faults                         # in CI: 1 kill point
    MIXER_FAULT_KILLS=10 bash tests/run.sh -m faults    # the full version

The reference run and the killed-and-restarted run must end with bit-identical
parameters (CPU). Checkpoints are written every step, so most kills land inside a
checkpoint write (about a third of each step's wall time is saving).
"""

import glob
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw
import pytest

from conftest import (REPO, config_flags, read_metrics, run_main, tiny_config,
                      without_compilation_cache)
from configs import finetune
from mixer_jax import errors
from mixer_jax import evaluate
from mixer_jax import input_pipeline
from mixer_jax import models
from mixer_jax import resolution
from mixer_jax import run_record
from mixer_jax import train
from mixer_jax import weights
from mixer_jax import workdir as workdir_lib
from test_evaluate import SIZE as NPZ_SIZE, TINY as NPZ_TINY, write_checkpoint, write_folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  result = train.train_and_evaluate(tiny_config(data_dir, fewshot_every_steps=4), workdir)
  return workdir, result



@pytest.mark.slow
def test_fewshot_probe_of_a_middle_block_on_the_digits(trained, data_dir):
  """config.fewshot_layer=block_K probes block K's tokens (models.capture) instead of
  the pre-logits: other features, other accuracies, the same evaluation."""
  from mixer_jax import evaluate
  workdir, _ = trained
  results = {}
  for layer in ("pre_logits", "block_0"):
    c = tiny_config(data_dir, fewshot_layer=layer, fewshot_shots=(5,))
    results[layer] = evaluate.evaluate(c, workdir, fewshot=True)
  for r in results.values():
    assert 0.0 <= r["fewshot_5shot"] <= 1.0 and r["num_examples"] == 355
  assert results["block_0"]["fewshot_5shot"] != results["pre_logits"]["fewshot_5shot"]
  assert results["block_0"]["top1"] == results["pre_logits"]["top1"]
  bad = tiny_config(data_dir, fewshot_layer="block_9")
  with pytest.raises(errors.ConfigError, match="fewshot_layer='block_9' is not pre_logits"):
    evaluate.evaluate(bad, workdir, fewshot=True)

@pytest.mark.slow
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
  assert run_record.read_model_file(workdir)["num_classes"] == 10


@pytest.mark.slow
def test_scanned_and_unrolled_runs_resume_from_each_other(trained, data_dir, tmp_path,
                                                          monkeypatch):
  """The straight run's step 2 (unrolled) resumed scanned for step 3 (stopped there as
  if preempted), then unrolled for step 4: the straight run's losses and parameters to
  float32 rounding; each run wrote its own layout. (Runs before
  test_rerun_resumes..., which extends the `trained` run.)"""
  from test_checkpoint import stored_items
  reference, _ = trained
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  with monkeypatch.context() as m:
    m.setattr(workdir_lib.PreemptionWatcher, "should_stop", lambda self, step: step == 3)
    train.train_and_evaluate(tiny_config(data_dir, **{"model.scan": True}), workdir)
  stored = stored_items(workdir, 3)  # The scanned run kept its own layout...
  assert "['MixerBlock']['token_mixing']['Dense_0']['kernel']" in stored["params"]
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert stored_items(workdir, 4) == stored_items(reference, 4)  # ...and the unrolled its.
  starts = run_record.read(workdir)["starts"]
  assert [(s["step"], "model.scan" in s.get("accepted_changes", {})) for s in starts] == [
      (0, False), (2, True), (3, True)]  # Changed both times, without --accept_changes.
  rows, ref = {}, {}
  for merged, w in ((rows, workdir), (ref, reference)):
    for r in read_metrics(w):
      merged.setdefault(r["step"], {}).update(r)
  assert sorted(rows) == [3, 4]  # Train loss of step 3, then of step 4 and the eval.
  assert np.mean([rows[3]["train/loss"], rows[4]["train/loss"]]) == pytest.approx(
      ref[4]["train/loss"], rel=1e-5)
  assert rows[4]["eval/accuracy"] == ref[4]["eval/accuracy"]
  assert rows[4]["eval/loss"] == pytest.approx(ref[4]["eval/loss"], rel=1e-5)
  got, want = (weights.flatten(weights.load_params(os.path.join(w, "checkpoints", "4"))[0])
               for w in (workdir, reference))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=2e-5, err_msg=key)


def test_stopped_and_resumed_with_randaugment_on_device_is_bit_identical(data_dir, tmp_path,
                                                                          monkeypatch):
  """Flip and RandAugment in the train step draw from (seed, step, position): a run
  stopped after step 2 and resumed ends with the uninterrupted run's parameters, bit
  for bit."""
  flags = {"randaugment_on": "device", "randaugment_layers": 2, "randaugment_magnitude": 15}
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  train.train_and_evaluate(tiny_config(data_dir, **flags), straight)
  with monkeypatch.context() as m:
    m.setattr(workdir_lib.PreemptionWatcher, "should_stop", lambda self, step: step == 2)
    train.train_and_evaluate(tiny_config(data_dir, **flags), stopped)
  assert run_record.read(stopped)["config"]["randaugment_on"] == "device"
  train.train_and_evaluate(tiny_config(data_dir, **flags), stopped)
  assert [s["step"] for s in run_record.read(stopped)["starts"]] == [0, 2]
  got, want = (weights.flatten(weights.load_params(w)[0]) for w in (stopped, straight))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_rerun_resumes_and_raising_steps_continues(trained, data_dir):
  workdir, result = trained
  before = read_metrics(workdir)
  # Same command again: nothing left to do, no step repeated; the final metrics again.
  assert train.train_and_evaluate(tiny_config(data_dir), workdir) == result
  assert read_metrics(workdir) == before
  # A change to the run itself is refused before anything runs, naming old and new.
  with pytest.raises(errors.WorkdirError, match=r"batch_size: 32 -> 16; learning_rate"):
    train.train_and_evaluate(tiny_config(data_dir, batch_size=16, learning_rate=0.1), workdir)
  # More steps rebuild the schedule: refused, naming the rate the resume step would get;
  # accepted, step 5 trains at exactly that rate (a warm restart).
  with pytest.raises(errors.WorkdirError) as e:
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, learning_rate=2e-3),
                             workdir)
  said = float(re.search(r"rate at the resume step 4 becomes (\S+) instead", str(e.value))[1])
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, learning_rate=2e-3,
                                       log_every_steps=1),
                           workdir, accept_changes=["learning_rate", "num_train_steps"])
  rows = [r for r in read_metrics(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [2, 4, 5, 6]
  assert rows[2]["train/learning_rate"] == pytest.approx(said, rel=1e-3)
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))
  starts = run_record.read(workdir)["starts"]
  assert [s["step"] for s in starts] == [0, 4]
  assert starts[1]["accepted_changes"]["learning_rate"] == [3e-3, 2e-3]
  assert run_record.read(workdir)["config"]["num_train_steps"] == 6


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
  config = tiny_config(data_dir, randaugment_on="host")
  source = input_pipeline.get_source(config)
  batch = next(iter(input_pipeline.train_dataset(source, config, 16, 10, 0, 1)))
  # uint8 to the device (a quarter of float32's bytes); the steps scale to [-1, 1].
  assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype.name == "uint8"
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
  with pytest.raises(errors.WorkdirError, match="is not writable"):
    train.train_and_evaluate(tiny_config(data_dir), str(blocker / "sub"))


@pytest.mark.slow
def test_workdir_of_a_different_model_is_refused(trained, data_dir):
  workdir, _ = trained
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(errors.WorkdirError, match="model.hidden_dim: 16 -> 24"):
    train.train_and_evaluate(tiny_config(data_dir, **{"model.hidden_dim": 24}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
def test_init_from_a_workdir_takes_its_architecture(trained, data_dir, tmp_path):
  workdir, _ = trained
  config = tiny_config(data_dir, init_from=workdir, num_train_steps=1, image_size=0,
                       eval_every_steps=1, checkpoint_every_steps=1)
  for key in ("variant", "patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim",
              "channels_mlp_dim"):
    config.model[key] = "" if key == "variant" else None  # Nothing re-typed.
  train.train_and_evaluate(config, str(tmp_path / "ft"))
  model_file = run_record.read_model_file(str(tmp_path / "ft"))
  assert model_file["model"] == run_record.read_model_file(workdir)["model"]
  recorded = run_record.read(str(tmp_path / "ft"))["config"]
  # Named from its sizes: no preset has them.
  assert recorded["model.name"] == model_file["variant"] == "Mixer custom (patch 2, 2 x 16)"
  assert (recorded["model.family"], recorded["image_size"]) == ("mixer", 8)


def test_preemption_watcher_agrees_lag_steps_after_the_signal():
  import jax
  from mixer_jax import sharding
  watcher = workdir_lib.PreemptionWatcher(sharding.make_mesh(1, jax.devices()[:1]))
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    answers = [watcher.should_stop(s) for s in range(2, 2 + watcher.LAG + 2)]
  finally:
    watcher.close()
  # Checks already in flight say "go on"; the first one dispatched after the signal
  # stops the run, LAG steps later.
  assert answers == [False] * watcher.LAG + [True, True]


# ------------------------------------------------- the pre-training recipe
I1K = "configs/imagenet1k_pretrain.py:B/16"


def _shape_image(rng, size=40):
  """A random background with a random ellipse or rectangle of another colour."""
  colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))
  image = Image.new("RGB", (size, size), colour())
  draw = ImageDraw.Draw(image)
  x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
  x1, y1 = (int(v) for v in rng.integers(size // 2 + 4, size, 2))
  shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
  shape([x0, y0, x1, y1], fill=colour())
  return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """3 classes x 8 JPEGs (40x40) + a grayscale and an RGBA PNG + one corrupt JPEG."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / f"class_{c}")
    for i in range(8):
      _shape_image(rng).save(root / f"class_{c}" / f"img_{i}.jpg", quality=90)
  Image.fromarray(rng.integers(0, 256, (40, 40), np.uint8), "L").save(root / "class_0" / "gray.png")
  Image.fromarray(rng.integers(0, 256, (40, 40, 4), np.uint8), "RGBA").save(
      root / "class_1" / "rgba.png")
  corrupt = root / "class_2" / "broken.jpg"
  jpeg = (root / "class_2" / "img_0.jpg").read_bytes()
  corrupt.write_bytes(jpeg[:len(jpeg) // 3])  # A truncated JPEG: header fine, data cut.
  return str(root), str(corrupt)


def _lines(text):
  return [l for l in text.splitlines() if l.strip()]


def test_corrupt_image_in_a_folder_is_one_error_line_naming_it(image_folder, tmp_path):
  root, corrupt = image_folder
  result = run_main([f"--workdir={tmp_path / 'w'}", f"--config.dataset=folder:{root}"],
                    config=I1K, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  naming = [l for l in _lines(result.stderr) if corrupt in l]
  assert len(naming) == 1 and naming[0].startswith("Error: Image file ")
  assert "skip_corrupt_images" in naming[0]
  assert _lines(result.stderr)[-1] == naming[0]


@pytest.mark.slow
def test_imagenet1k_recipe_trains_on_an_image_folder_with_every_augmentation(image_folder,
                                                                             tmp_path):
  """configs/imagenet1k_pretrain.py end to end, shrunk, with every augmentation and
  regulariser, accumulation and bfloat16 on; the corrupt file skipped and named."""
  root, corrupt = image_folder
  workdir = tmp_path / "w"
  args = {
      "dataset": f"folder:{root}", "skip_corrupt_images": True,
      "image_size": 32, "model.patch_size": 8, "model.num_blocks": 1,
      "model.hidden_dim": 16, "model.tokens_mlp_dim": 8, "model.channels_mlp_dim": 32,
      "batch_size": 8, "grad_accum_steps": 2, "dtype": "bfloat16", "num_train_steps": 3,
      "warmup_steps": 1, "eval_split": "train", "log_every_steps": 3,
      "eval_every_steps": 3, "checkpoint_every_steps": 3,
      # Every augmentation and regulariser on.
      "train_crop": "inception", "train_flip": True, "randaugment_layers": 2,
      "randaugment_magnitude": 15, "mixup_alpha": 0.5, "model.stoch_depth": 0.1,
      "model.dropout": 0.1, "label_smoothing": 0.1, "log_image_grid": True,
  }
  # XLA's CPU backend optimisations only cost compile time for these 3 tiny steps.
  result = run_main([f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in args.items()],
                    config=I1K, timeout=240,
                    env_extra={"XLA_FLAGS": "--xla_backend_optimization_level=0"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "skipped 1 file: 1 undecodable" in result.stderr and corrupt in result.stderr

  rows = read_metrics(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  eval_rows = [r for r in rows if "eval/accuracy" in r]
  assert train_rows and eval_rows
  assert all(isinstance(r["train/loss"], float) and math.isfinite(r["train/loss"])
             for r in train_rows)
  assert 0.0 <= eval_rows[-1]["eval/accuracy"] <= 1.0
  # 24 JPEGs + the grayscale and RGBA PNGs, each once; the corrupt file left out.
  assert eval_rows[-1]["eval/num_examples"] == 26
  assert os.path.isdir(workdir / "checkpoints" / "3")

  import tensorflow as tf
  events = glob.glob(str(workdir / "events.out.tfevents.*"))
  assert events
  grids = []
  for path in events:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/augmented_images":
          assert value.metadata.plugin_data.plugin_name == "images"
          grids.append(tf.io.decode_png(value.tensor.string_val[2]).numpy())
  assert len(grids) == 1
  # 8 images of 32x32 on a 3x3 grid, with real (varied) content.
  assert grids[0].shape == (96, 96, 3) and grids[0][:64].std() > 5


# ---------------------------------------------------- fine-tuning (init_from)
# configs/finetune.py from a tiny released-layout `.npz` on a generated folder: the
# checkpoints after steps 1 and 2 are the `.npz` (head re-initialised to zeros) plus one
# and two clipped momentum-SGD steps, computed independently here; `evaluate` on the
# workdir reproduces the trainer's own final evaluation.
def _finetune_config(root, npz, **overrides):
  c = finetune.get_config(f"folder:{root}")
  for k, v in NPZ_TINY.items():
    c.model[k] = v
  c.init_from = npz
  c.image_size = NPZ_SIZE
  c.batch_size = 8
  c.num_train_steps = 2
  c.warmup_steps = 0  # The first step then uses the full learning rate.
  c.checkpoint_every_steps = 1
  c.eval_every_steps = 2
  c.log_every_steps = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def test_finetune_any_tfds_dataset_from_the_dataset_and_the_file_alone(data_dir, tmp_path):
  """`--config=configs/finetune.py --config.dataset=mixer_digits --config.init_from=FILE`
  with no other override: the model and resolution come from the file, the splits from
  the dataset. (That command's 500 steps of 512 images take 2.5 min on the 2-core CPU;
  here 2 of them, the one change.)"""
  npz = write_checkpoint(str(tmp_path / "tiny.npz"), 10)
  c = finetune.get_config()
  c.dataset, c.init_from, c.data_dir = "mixer_digits", npz, data_dir
  c.num_train_steps = 2
  outcome = {}
  train.train_and_evaluate(c, str(tmp_path / "w"), outcome=outcome)
  assert outcome["status"] == "finished" and outcome["eval"]["num_examples"] == 355
  assert (c.train_split, c.eval_split, c.image_size) == ("train", "test", NPZ_SIZE)
  assert c.model.name == models.model_name("mixer", NPZ_TINY)


@pytest.mark.slow
def test_finetune_end_to_end(tmp_path, caplog):
  root = write_folder(str(tmp_path / "data"), 3, 8)
  npz_path = write_checkpoint(str(tmp_path / "Mixer-tiny_10.npz"), 10,
                              bias=np.linspace(-1, 1, 10).astype(np.float32))
  config = _finetune_config(root, npz_path)
  workdir = str(tmp_path / "work")
  with caplog.at_level(logging.INFO):
    final = train.train_and_evaluate(config, workdir)
  # The run is named from its sizes, in the log, model.json and config.json; the
  # head's re-initialisation (10 classes -> 3) is logged once.
  name = models.model_name("mixer", NPZ_TINY)
  assert name.startswith("Mixer custom (patch ")
  messages = [r.getMessage() for r in caplog.records]
  assert [m for m in messages if m.startswith("Training ")][0].startswith(f"Training {name} (")
  assert len([m for m in messages if "Re-initialising the head" in m]) == 1, messages
  assert run_record.read_model_file(workdir)["variant"] == name
  assert run_record.read(workdir)["config"]["model.name"] == name

  # Independent reference: the trainer's first two batches, the .npz with a fresh zero
  # head, and two clipped momentum-SGD steps written out by hand.
  source = input_pipeline.get_source(config)
  batches = iter(input_pipeline.train_dataset(source, config, 8, 3, 0, 1))
  model = models.from_preset("S/4", 3, **NPZ_TINY)

  def clipped_grads(flat_params):
    batch = input_pipeline.to_numpy(next(batches))

    def loss(p):
      images = np.asarray(batch["image"], np.float32) / 127.5 - 1.0  # uint8 batches.
      logits = model.apply({"params": p}, images, train=False)
      return optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], 3)).mean()

    grads = weights.flatten(jax.device_get(jax.grad(loss)(weights.unflatten(
        {k: jnp.asarray(v) for k, v in flat_params.items()}))))
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in grads.values())))
    return {k: g * min(1.0, config.grad_clip_norm / norm) for k, g in grads.items()}

  start = weights.flatten(weights.load_npz(npz_path))
  start["head/kernel"] = np.zeros((NPZ_TINY["hidden_dim"], 3), np.float32)
  start["head/bias"] = np.zeros(3, np.float32)
  lr = [config.learning_rate, config.learning_rate * 0.5]  # Cosine over 2 steps, no warmup.
  g1 = clipped_grads(start)
  expected1 = {k: start[k] - lr[0] * g1[k] for k in start}
  g2 = clipped_grads(expected1)
  expected2 = {k: expected1[k] - lr[1] * (g2[k] + config.momentum * g1[k]) for k in start}

  step1, info = weights.load_params(os.path.join(workdir, "checkpoints", "1"))
  step2, _ = weights.load_params(os.path.join(workdir, "checkpoints", "2"))
  step1, step2 = weights.flatten(step1), weights.flatten(step2)
  assert set(step1) == set(start) and info["num_classes"] == 3
  for k in start:
    np.testing.assert_allclose(step1[k], expected1[k], atol=2e-6, err_msg=k)
    np.testing.assert_allclose(step2[k], expected2[k], atol=2e-6, err_msg=k)
  # With a zero head kernel no gradient reaches the body, so the first step moves only
  # the head; the second moves everything.
  assert np.any(step1["head/kernel"])
  for k in start:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(step1[k], start[k])
  moved = [k for k in start if np.any(step2[k] != start[k])]
  assert "stem/kernel" in moved and "MixerBlock_0/token_mixing/Dense_0/kernel" in moved
  with open(os.path.join(workdir, "model.json")) as f:
    assert json.load(f)["model"] == NPZ_TINY

  # evaluate on the workdir (latest step = 2) reproduces the trainer's final evaluation.
  result = evaluate.evaluate(config, workdir)
  assert result["split"] == "validation" and result["num_examples"] == 24
  assert result["top1"] == pytest.approx(final["accuracy"], abs=1e-9)
  assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_finetune_higher_resolution(tmp_path):
  """At twice the checkpoint's side: K^2 = 4 block-diagonal token-mixing copies."""
  root = write_folder(str(tmp_path / "data"), 3, 4)
  npz_path = write_checkpoint(str(tmp_path / "Mixer-tiny_10.npz"), 10)
  config = _finetune_config(root, npz_path, image_size=2 * NPZ_SIZE, num_train_steps=1)
  workdir = str(tmp_path / "work")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "model.json")) as f:
    record = json.load(f)
  assert record["image_size"] == 16
  assert record["model"] == dict(NPZ_TINY, tokens_mlp_dim=4 * NPZ_TINY["tokens_mlp_dim"])
  # The zero head passes no gradient to the body in step 1: the body is still the init.
  step1 = weights.flatten(weights.load_params(workdir)[0])
  pre = weights.flatten(weights.load_npz(npz_path))
  prefix = "MixerBlock_0/token_mixing/"
  expanded = resolution.expand_token_mixing(
      *(pre[prefix + n] for n in ("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel",
                                  "Dense_1/bias")), 2)
  for n, v in zip(("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"),
                  expanded):
    np.testing.assert_array_equal(step1[prefix + n], v)
  for k in pre:
    if not k.startswith(("head/", prefix)):
      np.testing.assert_array_equal(step1[k], pre[k])
  # The workdir evaluates at its own 16 px and names that size when asked for 8.
  assert evaluate.evaluate(config, workdir)["image_size"] == 16
  with pytest.raises(errors.CheckpointError, match="image size 16"):
    evaluate.evaluate(config, workdir, image_size=8)


# ---------------------------------------------------------------------- faults
STEPS = 24


# The paper's augmentation in the train step: its random numbers come from (seed, step)
# too, so a killed run still resumes bit-identical.
DEVICE_RANDAUGMENT = ("--config.randaugment_on=device", "--config.randaugment_layers=2",
                      "--config.randaugment_magnitude=15")


def _flags(data_dir, workdir, extra=()):
  return config_flags(data_dir, num_train_steps=STEPS, checkpoint_every_steps=1,
                      keep_checkpoints=2, log_every_steps=4,
                      eval_every_steps=STEPS) + [f"--workdir={workdir}"] + list(extra)


def _start(data_dir, workdir, log_path, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  # Logs go to a file: a pipe nobody reads would fill up and stall the run.
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "mixer_jax.main", "--config=configs/default.py"]
        + _flags(data_dir, workdir, extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=log)


def _finish(proc, log_path):
  proc.wait(timeout=600)
  with open(log_path) as f:
    log = f.read()
  assert proc.returncode == 0, log[-3000:]
  return log


def _wait_until_training(proc, log_path, timeout=300):
  """Blocks until the run logs its first training line (imports, restore and
  compilation done) or exits."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    with open(log_path) as f:
      if " params) for " in f.read():  # "Training <name> (N params) for ... steps"
        return
    time.sleep(0.05)


def _latest_step(workdir) -> int:
  path = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=0)


def _save_in_progress(workdir) -> bool:
  """Whether a checkpoint write was cut: orbax temp dirs or a data-state temp dir."""
  for root, dirs, _ in os.walk(workdir):
    if any("tmp" in d for d in dirs):
      return True
  return False


def _final_params(workdir):
  params, _ = weights.load_params(str(workdir))
  return weights.flatten(params)


def _assert_identical(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory, request):
  """The uninterrupted run (with extra flags where a test parametrizes it):
  (workdir, final params, training seconds, the extra flags)."""
  extra = getattr(request, "param", ())
  workdir = tmp_path_factory.mktemp("reference")
  log = workdir.parent / f"{workdir.name}.log"
  proc = _start(data_dir, workdir, log, extra)
  _wait_until_training(proc, log)
  start = time.time()
  _finish(proc, log)
  return workdir, _final_params(workdir), time.time() - start, extra


# CI kills the host-augmented run; MIXER_FAULT_MOMENTS=all also the device-augmented one
# (test_stopped_and_resumed_with_randaugment_on_device_is_bit_identical covers its resume
# in CI, in process).
@pytest.mark.faults
@pytest.mark.parametrize(
    "reference", [()] + ([DEVICE_RANDAUGMENT] if os.environ.get("MIXER_FAULT_MOMENTS") == "all"
                         else []), indirect=True,
    ids=["host"] + (["device_randaugment"] if os.environ.get("MIXER_FAULT_MOMENTS") == "all"
                    else []))
def test_sigkill_anywhere_then_restart_is_bit_identical(data_dir, tmp_path, reference):
  _, expected, train_seconds, extra = reference
  kills = int(os.environ.get("MIXER_FAULT_KILLS", "1"))
  rng = random.Random(int(os.environ.get("MIXER_FAULT_SEED", "0")))
  workdir = tmp_path / "killed"
  killed, during_save, attempts = 0, 0, 0
  while True:
    attempts += 1
    assert attempts <= 4 * kills + 4, "the run made no progress between kills"
    log_path = tmp_path / f"attempt_{attempts}.log"
    proc = _start(data_dir, workdir, log_path, extra)
    final_saved = os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))
    if killed < kills and not final_saved:
      # Kill anywhere in the training part of the run (steps, checkpoint writes,
      # evaluation), timed from the moment the run starts training.
      _wait_until_training(proc, log_path)
      # Spread the remaining kills over the remaining steps.
      done = _latest_step(workdir)
      remaining = train_seconds * (STEPS - done) / STEPS
      deadline = time.time() + rng.uniform(0.0, 1.6 * remaining / (kills - killed + 1))
      while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
        during_save += _save_in_progress(workdir)
        continue
    log = _finish(proc, log_path)
    if killed >= kills or final_saved or os.path.isdir(
        os.path.join(workdir, "checkpoints", str(STEPS))):
      break
  print(f"{killed} kills, {during_save} during a checkpoint write, {attempts} starts")
  assert killed == kills, f"only {killed} of {kills} kills landed before the run finished"
  if killed >= 10:
    assert during_save >= 1, "no kill landed inside a checkpoint write"
  # The last start resumed (it did not silently start over from step 0).
  assert "Resumed from step" in log
  _assert_identical(_final_params(workdir), expected)


@pytest.mark.faults
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path,
                                                                    reference):
  ref_dir, expected, _, _ = reference
  workdir = tmp_path / "truncated"
  shutil.copytree(ref_dir, workdir)
  latest = os.path.join(workdir, "checkpoints", str(STEPS))
  victims = [os.path.join(root, f) for root, _, files in os.walk(latest) for f in files
             if os.path.getsize(os.path.join(root, f)) > 1000]
  for path in victims:  # Truncate every data file of the newest step.
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  err = _finish(_start(data_dir, workdir, tmp_path / "run.log"), tmp_path / "run.log")
  assert f"Checkpoint step {STEPS}" in err and "unreadable" in err
  assert f"Resumed from step {STEPS - 1}" in err
  assert os.listdir(os.path.join(workdir, "unreadable_checkpoints"))  # Kept, not deleted.
  # The run fell back to step STEPS-1, redid the last step and ended where it would have.
  _assert_identical(_final_params(workdir), expected)


# Signals at each moment of a run: (signals, extra flags, what the log or workdir shows
# just before the moment, exit code, status). In CI the two that crashed or were
# ignored before; MIXER_FAULT_MOMENTS=all runs every row.
MOMENTS = {
    "compile": ([signal.SIGINT], [], "log:Compiling the train step", 130, "interrupted"),
    "double_ctrl_c": ([signal.SIGINT, signal.SIGINT], [], "log:Compiling the train step", 130,
                      "interrupted"),
    "step": ([signal.SIGINT], [], "step:5", 130, "interrupted"),
    "periodic_eval": ([signal.SIGINT], ["--config.eval_every_steps=8"],
                      "log:Evaluating step 8 ", 130, "interrupted"),
    "save": ([signal.SIGINT], [], "log:Saving checkpoint step 10.", 130, "interrupted"),
    "final_eval": ([signal.SIGINT], [], f"log:Evaluating step {STEPS} ", 130, "interrupted"),
    "sigterm": ([signal.SIGTERM], [], "step:5", 0, "preempted"),
}
CI_MOMENTS = ("double_ctrl_c", "final_eval")


def _selected_moments():
  chosen = os.environ.get("MIXER_FAULT_MOMENTS", ",".join(CI_MOMENTS))
  return list(MOMENTS) if chosen == "all" else chosen.split(",")


def _wait_for(proc, log_path, workdir, what, timeout=300):
  kind, text = what.split(":", 1)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if kind == "log":
      with open(log_path) as f:
        if text in f.read():
          return True
    elif os.path.isdir(os.path.join(workdir, "checkpoints", text)):
      return True
    time.sleep(0.02)
  return False


@pytest.mark.faults
@pytest.mark.parametrize("moment", _selected_moments())
def test_signals_at_each_moment_give_the_documented_exit_and_last_line(
    data_dir, tmp_path, reference, moment):
  """Exit code, one JSON outcome as the last stdout line, one stderr line, no
  traceback or crash (a second Ctrl-C during compilation was exit 139); the same
  command then ends bit-identical to the uninterrupted run (docs/errors.md#exit-codes)."""
  _, expected, _, _ = reference
  signals, extra, when, code, status = MOMENTS[moment]
  workdir, out_path, log_path = tmp_path / "w", tmp_path / "out", tmp_path / "err"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "mixer_jax.main", "--config=configs/default.py"] + _flags(
      data_dir, workdir) + extra
  # A signal meant for the compile lands in XLA's compiler, not in a load from the
  # suite's compilation cache (conftest.py): that run compiles cold.
  first_env = (without_compilation_cache(env) if when == "log:Compiling the train step"
               else env)
  with open(out_path, "w") as out, open(log_path, "w") as err:
    proc = subprocess.Popen(cmd, cwd=REPO, env=first_env, stdout=out, stderr=err)
  assert _wait_for(proc, log_path, workdir, when), open(log_path).read()[-3000:]
  for i, sig in enumerate(signals):
    if i:
      time.sleep(0.3)
    proc.send_signal(sig)
  proc.wait(timeout=600)
  err = open(log_path).read()
  assert proc.returncode == code, err[-3000:]
  assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
  last = json.loads(open(out_path).read().strip().splitlines()[-1])
  assert last["status"] == status and last["step"] >= 0, last
  saved = _latest_step(workdir)
  assert last["saved_step"] == (saved or None), (last, saved)
  if code == 130:
    line = err.strip().splitlines()[-1]
    assert line.startswith("Interrupted: "), line
    assert (f"step {saved}" in line) if saved else "no checkpoint" in line, line
  if moment == "final_eval":
    assert last["eval_step"] == STEPS and "accuracy" in last["eval"]
    assert err.strip().splitlines()[-1] == (
        f"Interrupted: checkpoint saved at step {STEPS} (the run is finished).")
  # The same command resumes and ends where the uninterrupted run did.
  with open(out_path, "w") as out, open(log_path, "w") as err_file:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err_file)
  _finish(proc, log_path)
  final = json.loads(open(out_path).read().strip().splitlines()[-1])
  assert final["status"] == "finished" and final["step"] == STEPS, final
  _assert_identical(_final_params(workdir), expected)


def test_init_from_names_the_family_of_another_familys_checkpoint():
  """A ResMLP checkpoint under a Mixer config (or the reverse) is one sentence; an empty
  variant takes the checkpoint's family and sizes (the ResMLP has no tokens_mlp_dim)."""
  from mixer_jax import state as state_lib
  info = {"model": dict(patch_size=2, num_blocks=2, hidden_dim=16, channels_mlp_dim=32),
          "num_classes": 10, "image_size": 8, "variant": "resmlp_12"}
  with pytest.raises(errors.CheckpointError, match=(
      r"^config.model.variant=S/2 is a mixer model but init_from r.npz is a resmlp "
      r"\(resmlp_12\); set --config.model.variant=''")):
    state_lib.resolve_model(tiny_config("/nonexistent"), info, "r.npz")
  config = tiny_config("/nonexistent", **{
      "model.variant": "", "model.tokens_mlp_dim": None, "model.num_blocks": None,
      "model.hidden_dim": None, "model.channels_mlp_dim": None, "model.patch_size": None})
  state_lib.resolve_model(config, info, "r.npz")
  assert (config.model.family, config.model.name) == ("resmlp", "ResMLP custom (patch 2, 2 x 16)")
  assert state_lib.size_fields(config) == info["model"]
