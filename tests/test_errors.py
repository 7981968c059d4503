"""The catalogue of bad inputs (README "Errors you may see"): each gives one sentence
on stderr, a non-zero exit and loses nothing.

Most cases run the trainer in-process through the same guard the entry points use
(`errors.run_guarded`), so they are fast; the command-line-only cases (flag parsing,
device counts, processes) run `python -m mixer_jax.main`.
"""

import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import config_flags, read_metrics, run_main, tiny_config
from mixer_jax import errors
from mixer_jax import models
from mixer_jax import train
from mixer_jax import weights


def guarded_run(config, workdir, capsys):
  """Runs training as `main` does; returns (exit code, stderr)."""
  with pytest.raises(SystemExit) as exit_info:
    errors.run_guarded(lambda: train.train_and_evaluate(config, str(workdir)))
  return exit_info.value.code, capsys.readouterr().err


def assert_one_sentence(err, fragment):
  lines = [l for l in err.strip().splitlines() if l.startswith("Error:")]
  assert len(lines) == 1, err[-2000:]
  assert fragment in lines[0], lines[0]
  assert "Traceback" not in err


def make_folder(root, classes=("a", "b"), per_class=3, size=8, mode="RGB"):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(per_class):
      channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
      pixels = rng.integers(0, 255, (size, size, channels), dtype=np.uint8)
      Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
          os.path.join(root, c, f"{i}.png"))
  return root


def tiny_npz(path, **model_overrides):
  fields = dict(patch_size=2, num_blocks=2, hidden_dim=16, tokens_mlp_dim=16,
                channels_mlp_dim=32)
  fields.update(model_overrides)
  model = models.from_preset("S/2", 10, **fields)
  weights.save_npz(models.init_params(model, 8), str(path))
  return str(path)


# (id, config overrides, expected fragment of the one sentence)
CONFIG_CASES = [
    ("batch_size_zero", dict(batch_size=0), "config.batch_size=0 must be a positive number"),
    ("batch_size_negative", dict(batch_size=-8), "config.batch_size=-8 must be a positive"),
    ("image_size_zero", dict(image_size=0), "config.image_size=0 means init_from's image size, "
     "but no config.init_from is set"),
    ("image_size_negative", dict(image_size=-8), "config.image_size=-8 must be a positive"),
    ("variant_empty", {"model.variant": ""}, "config.model.variant is empty, which means "
     "init_from's architecture, but no config.init_from is set"),
    ("learning_rate_negative", dict(learning_rate=-0.1), "config.learning_rate=-0.1 must be"),
    ("num_steps_and_epochs_zero", dict(num_train_steps=0, num_epochs=0.0),
     "config.num_epochs=0.0 must be a positive number"),
    ("unknown_variant", {"model.variant": "M/16"}, "Unknown Mixer variant 'M/16'"),
    ("negative_model_field", {"model.hidden_dim": -4},
     "config.model.hidden_dim=-4 must be a positive integer"),
    ("image_not_divisible_by_patch", dict(image_size=9),
     "Image side 9 is not divisible by the patch size 2"),
    ("accumulation_not_dividing_batch", dict(grad_accum_steps=5),
     "config.grad_accum_steps=5 must be a positive divisor of config.batch_size=32"),
    ("labels_out_of_range", dict(num_classes=3),
     "config.num_classes=3 is smaller than the 10 classes"),
    ("unknown_loss", dict(loss="l2"), "config.loss='l2' is not one of softmax, sigmoid"),
    ("unknown_optimizer", dict(optimizer="lars"), "config.optimizer='lars' is not one of"),
    ("unknown_schedule", dict(lr_decay="step"), "config.lr_decay='step' is not one of"),
    ("unknown_sharding", dict(sharding="zero3"), "config.sharding='zero3' is not one of"),
    ("randaugment_magnitude", dict(randaugment_magnitude=45),
     "config.randaugment_magnitude=45 must be in [0, 30]"),
    ("label_smoothing", dict(label_smoothing=1.0), "config.label_smoothing=1.0 must be in"),
    ("unknown_dtype", dict(dtype="fp8"), "config.dtype='fp8' is not one of"),
    ("unknown_crop", dict(train_crop="center"), "config.train_crop='center' is not one of"),
    ("mesh_model_not_dividing", dict(mesh_model=3),
     "mesh_model=3 must be a positive divisor of the device count 1"),
]


@pytest.mark.parametrize("overrides,fragment", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(data_dir, tmp_path, capsys, overrides, fragment):
  code, err = guarded_run(tiny_config(data_dir, **overrides), tmp_path / "w", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, fragment)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def _data_case(name, tmp_path, data_dir):
  """Config overrides + expected fragment for each data problem."""
  empty_tfds = str(tmp_path / "empty_tfds")
  os.makedirs(empty_tfds, exist_ok=True)
  if name == "unknown_dataset":
    return dict(dataset="imagenet_9000"), "Unknown TFDS dataset 'imagenet_9000'"
  if name == "unprepared_dataset":
    return dict(dataset="cifar10", data_dir=empty_tfds), "tfds build cifar10 --data_dir"
  if name == "imagenet_without_tars":
    return (dict(dataset="imagenet2012", data_dir=empty_tfds),
            "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual dir")
  if name == "empty_split":
    return dict(eval_split="test[:0]"), "is empty"
  if name == "unknown_split":
    return dict(eval_split="validation"), "has no split 'validation'"
  if name == "missing_folder":
    return dict(dataset=f"folder:{tmp_path}/nowhere"), "nowhere"
  if name == "folder_without_classes":
    os.makedirs(tmp_path / "bare")
    return dict(dataset=f"folder:{tmp_path}/bare"), "bare"
  if name == "empty_class_folder":
    root = make_folder(str(tmp_path / "f"))
    os.makedirs(os.path.join(root, "c"))
    return dict(dataset=f"folder:{root}", eval_split="train"), "empty"
  if name == "corrupt_image":
    root = make_folder(str(tmp_path / "f"))
    with open(os.path.join(root, "a", "broken.png"), "wb") as f:
      f.write(b"\x89PNG not really")
    return dict(dataset=f"folder:{root}", eval_split="train"), "broken.png"
  raise AssertionError(name)


DATA_CASES = ["unknown_dataset", "unprepared_dataset", "imagenet_without_tars", "empty_split",
              "unknown_split", "missing_folder", "folder_without_classes",
              "empty_class_folder", "corrupt_image"]


@pytest.mark.parametrize("name", DATA_CASES)
def test_data_errors(data_dir, tmp_path, capsys, name):
  overrides, fragment = _data_case(name, tmp_path, data_dir)
  code, err = guarded_run(tiny_config(data_dir, **overrides), tmp_path / "w", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, fragment)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_grayscale_and_rgba_images_are_converted_not_refused(data_dir, tmp_path):
  root = str(tmp_path / "mixed")
  make_folder(root, classes=("a",), mode="L")
  make_folder(root, classes=("b",), mode="RGBA")
  config = tiny_config(data_dir, dataset=f"folder:{root}", eval_split="train",
                       num_train_steps=1, batch_size=4, eval_every_steps=1)
  result = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert result["num_examples"] == 6


def _checkpoint_case(name, tmp_path):
  if name == "init_from_missing_file":
    return str(tmp_path / "nope.npz"), "does not exist"
  if name == "init_from_text_file":
    (tmp_path / "notes.txt").write_text("not weights")
    return str(tmp_path / "notes.txt"), "is not a readable .npz checkpoint"
  if name == "init_from_truncated_npz":
    path = tiny_npz(tmp_path / "t.npz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path, "truncated"
  if name == "init_from_missing_keys":
    path = tiny_npz(tmp_path / "m.npz")
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files if not k.startswith("MixerBlock_1/channel_mixing")}
    np.savez(path, **flat)
    return path, "is missing parameter MixerBlock_1/channel_mixing"
  if name == "init_from_wrong_shapes":
    return (tiny_npz(tmp_path / "w.npz", channels_mlp_dim=48),
            "config.model gives channels_mlp_dim=32 (variant S/2) but init_from")
  if name == "init_from_other_depth":
    return tiny_npz(tmp_path / "d.npz", num_blocks=3), "was trained with num_blocks=3"
  if name == "init_from_directory_not_checkpoint":
    os.makedirs(tmp_path / "random_dir")
    return str(tmp_path / "random_dir"), "neither a .npz checkpoint nor a workdir"
  raise AssertionError(name)


CHECKPOINT_CASES = ["init_from_missing_file", "init_from_text_file", "init_from_truncated_npz",
                    "init_from_missing_keys", "init_from_wrong_shapes", "init_from_other_depth",
                    "init_from_directory_not_checkpoint"]


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_checkpoint_errors(data_dir, tmp_path, capsys, name):
  path, fragment = _checkpoint_case(name, tmp_path)
  code, err = guarded_run(tiny_config(data_dir, init_from=path), tmp_path / "w", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, fragment)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_high_resolution_size_not_a_multiple(data_dir, tmp_path, capsys):
  path = tiny_npz(tmp_path / "r.npz")  # Trained at 8 px (16 tokens).
  code, err = guarded_run(tiny_config(data_dir, init_from=path, image_size=12), tmp_path / "w",
                          capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, "16, 24")  # The allowed sizes are named.


@pytest.fixture
def small_trained(data_dir, tmp_path):
  workdir = tmp_path / "trained"
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), str(workdir))
  return workdir


def test_different_variant_in_workdir_keeps_checkpoints(data_dir, small_trained, capsys):
  before = sorted(os.listdir(small_trained / "checkpoints"))
  code, err = guarded_run(tiny_config(data_dir, **{"model.num_blocks": 3}), small_trained, capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, "changes the run (model.num_blocks: 2 -> 3;")
  # A workdir without its record (config.json) is checked against the config its
  # checkpoints carry.
  os.remove(small_trained / "config.json")
  code, err = guarded_run(tiny_config(data_dir, **{"model.num_blocks": 3}), small_trained, capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, "changes the run (model.num_blocks: 2 -> 3;")
  assert sorted(os.listdir(small_trained / "checkpoints")) == before


def test_unknown_key_in_a_config_file(data_dir, tmp_path):
  config_file = tmp_path / "typo.py"
  config_file.write_text("from configs import default\n\n\ndef get_config():\n"
                         "  c = default.get_config()\n  c.batchsize = 8\n  return c\n")
  result = run_main(config_flags(data_dir) + [f"--workdir={tmp_path / 'w'}"],
                    config=str(config_file))
  assert result.returncode == errors.USER_ERROR
  assert_one_sentence(result.stderr, "sets unknown key 'batchsize' (did you mean "
                                     "'batch_size'?)")
  assert not (tmp_path / "w").exists()


def test_unwritable_workdir(data_dir, tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  code, err = guarded_run(tiny_config(data_dir), tmp_path / "a_file" / "w", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, "is not writable")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path, capsys):
  mount_point = tmp_path / "small_disk"
  mount_point.mkdir()
  # A real full disk: a tmpfs just large enough for the first checkpoint.
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=420k", "tmpfs",
                            str(mount_point)], capture_output=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    config = tiny_config(data_dir, num_train_steps=8, checkpoint_every_steps=2,
                         keep_checkpoints=5)
    code, err = guarded_run(config, mount_point / "w", capsys)
    assert code == errors.USER_ERROR
    assert_one_sentence(err, "failed (")
    assert "is intact" in err and "free disk space" in err
    params, _ = weights.load_params(str(mount_point / "w"))  # The last good one reads.
    assert params["stem"]["kernel"].shape == (2, 2, 3, 16)
  finally:
    subprocess.run(["umount", str(mount_point)], check=False)


def test_nonfinite_loss_stops_naming_the_step(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir, learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=0,
                       lr_decay="constant", num_train_steps=6, log_every_steps=1,
                       checkpoint_every_steps=1)
  with pytest.raises(SystemExit) as exit_info:
    errors.run_guarded(lambda: train.train_and_evaluate(config, str(tmp_path / "w")))
  assert exit_info.value.code == errors.STOPPED
  err = capsys.readouterr().err
  assert_one_sentence(err, "Non-finite")
  assert "at step" in err
  saved = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
  params, _ = weights.load_params(str(tmp_path / "w"))
  assert all(np.isfinite(v).all() for v in weights.flatten(params).values())
  assert max(saved, default=0) < 6


def test_nonfinite_skip_counts_and_keeps_params_finite(data_dir, tmp_path):
  config = tiny_config(data_dir, learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=0,
                       lr_decay="constant", num_train_steps=6, log_every_steps=6,
                       nonfinite="skip")
  train.train_and_evaluate(config, str(tmp_path / "w"))
  rows = read_metrics(tmp_path / "w")
  skipped = [r["train/nonfinite_steps"] for r in rows if "train/nonfinite_steps" in r]
  assert skipped and skipped[-1] >= 1
  params, _ = weights.load_params(str(tmp_path / "w"))
  assert all(np.isfinite(v).all() for v in weights.flatten(params).values())


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_cli_partial_coordinator_flags(data_dir, tmp_path):
  out = run_main(config_flags(data_dir) + [f"--workdir={tmp_path}/w", "--num_processes=2"])
  assert out.returncode == errors.USER_ERROR
  assert_one_sentence(out.stderr, "Pass --coordinator_address, --num_processes and --process_id")


@pytest.mark.multiprocess
def test_cli_peer_that_never_starts(data_dir, tmp_path):
  out = run_main(config_flags(data_dir) + [
      f"--workdir={tmp_path}/w", f"--coordinator_address=localhost:{_free_port()}",
      "--num_processes=2", "--process_id=0", "--init_timeout_s=5"], timeout=120)
  assert out.returncode == errors.USER_ERROR
  assert_one_sentence(out.stderr, "Not all 2 processes joined the coordinator")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("args,fragment", [
    (["--config=configs/nope.py"], "Config file configs/nope.py cannot be loaded"),
    (["--config=configs/imagenet1k_pretrain.py:S/7"], "Unknown variant 'S/7'"),
    (["--config=configs/default.py", "--config.model.hiden_dim=3"],
     "Unknown config key 'hiden_dim'"),
    (["--config=configs/default.py", "--config.num_train_steps=many"],
     "--config.num_train_steps=many has the wrong type"),
    (["--config=configs/default.py", "--no_such_flag=1"], "Unknown command line flag"),
    (["--config=configs/nope.py", "--config.seed=1"],
     "Config file configs/nope.py cannot be loaded (no such file)"),
    (["--config={tmp}/syntax.py"],
     "Config file {tmp}/syntax.py has a syntax error at line 2"),
    (["--config={tmp}/name.py", "--config.seed=1"],
     "Config file {tmp}/name.py raises NameError at line 3 (name 'undefined_name' is not"),
], ids=["missing_config_file", "bad_config_argument", "unknown_nested_key", "wrong_type",
        "unknown_flag", "missing_config_file_with_override", "config_syntax_error",
        "config_name_error"])
def test_cli_flag_errors_are_one_sentence(tmp_path, args, fragment):
  import sys
  from conftest import REPO
  (tmp_path / "syntax.py").write_text("def get_config():\n  return (\n")
  (tmp_path / "name.py").write_text("def get_config():\n  x = 1\n  return undefined_name\n")
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  fragment = fragment.replace("{tmp}", str(tmp_path))
  out = subprocess.run([sys.executable, "-m", "mixer_jax.main", f"--workdir={tmp_path}/w"] + args,
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == errors.USER_ERROR, out.stderr[-2000:]
  assert_one_sentence(out.stderr, fragment)
  assert not os.path.exists(tmp_path / "w")


# ---------------------------------------------------- mistakes caught before the work
def test_image_size_the_fixed_size_images_cannot_give(data_dir, tmp_path, capsys):
  # The 8x8 digits taken as they are (train_crop "none") at 16 px: refused before
  # anything is compiled, naming the sizes and both fixes.
  code, err = guarded_run(tiny_config(data_dir, image_size=16), tmp_path / "w", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, "config.image_size=16 but dataset mixer_digits has 8 x 8 images, "
                      "which config.train_crop='none' uses as they are (no resize); use "
                      "--config.image_size=8 or --config.train_crop=resize")
  # A folder of 12 px images with configs/default.py (image_size 8, train_crop "none").
  root = make_folder(str(tmp_path / "f"), size=12)
  code, err = guarded_run(tiny_config(data_dir, dataset=f"folder:{root}", eval_split="train"),
                          tmp_path / "w2", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, f"dataset folder:{root} has 12 x 12 images")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_batch_larger_than_the_memory_is_refused_before_it_runs(data_dir, tmp_path, capsys):
  code, err = guarded_run(tiny_config(data_dir, batch_size=100_000_000), tmp_path / "w", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, "config.batch_size=100000000 needs an estimated ")
  assert "GiB per device for the train step" in err and "available; use a smaller" in err
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_memory_check_compares_the_peak_with_the_available_bytes():
  from types import SimpleNamespace
  from mixer_jax import device_memory
  gib = device_memory.GIB
  stats = SimpleNamespace(argument_size_in_bytes=2 * gib, temp_size_in_bytes=5 * gib,
                          output_size_in_bytes=2 * gib, alias_size_in_bytes=2 * gib)
  assert device_memory.peak_bytes(stats) == 7 * gib
  device_memory.check_fits(stats, 64, (8 * gib, "each H100 device has"))  # Fits.
  device_memory.check_fits(stats, 64, None)  # Unknown memory: not checked.
  with pytest.raises(errors.ConfigError, match=r"config.batch_size=64 needs an estimated "
                     r"7.00 GiB per device .* but each H100 device has 6.00 GiB available"):
    device_memory.check_fits(stats, 64, (6 * gib, "each H100 device has"))


def test_workdir_that_is_a_file(data_dir, tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  code, err = guarded_run(tiny_config(data_dir), tmp_path / "a_file", capsys)
  assert code == errors.USER_ERROR
  assert_one_sentence(err, f"Workdir {tmp_path}/a_file is a file, not a directory; choose "
                      "another --workdir")


USAGE_ERRORS = [
    ("mixer_jax.main", []),
    ("mixer_jax.main", ["--config=configs/default.py", "--workdir=/tmp/x", "extra"]),
    ("mixer_jax.predict", ["--no_such_flag"]),
    ("mixer_jax.export", ["--no_such_flag"]),
    ("mixer_jax.tools.plot", ["--no_such_flag"]),
    ("mixer_jax.tools.summary", ["--variant=Q/3"]),
]


def test_cli_usage_errors_exit_2():
  """Every entry point and tool, started together (their start-ups overlap)."""
  import concurrent.futures
  import sys
  from conftest import REPO

  def run(module, args):
    return subprocess.run([sys.executable, "-m", module] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    outs = list(pool.map(lambda case: run(*case), USAGE_ERRORS))
  for (module, args), out in zip(USAGE_ERRORS, outs):
    assert out.returncode == errors.USER_ERROR, (module, args, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, (module, args)
