"""evaluate: exact counts on a tiny ILSVRC-format ImageNet (1 and 8 devices), ReaL,
few-shot, and one-sentence errors.

The headline check builds `ILSVRC2012_img_train.tar` (per-synset tars) and
`ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_%08d.JPEG`) with a few dozen JPEGs, lets
TFDS prepare `imagenet2012` from them offline, and evaluates a checkpoint whose
predictions are known in advance: its head kernel is zero, so the logits are the head
bias for every image, which ranks five chosen classes first.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import common
from configs import finetune
from mixer_jax import evaluate, input_pipeline, models, weights
from mixer_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=4, num_blocks=1, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=8)
SIZE = 8  # 2x2 tokens of 4x4 px.
NUM_VAL = 30
SYNSETS = ("n01440764", "n01443537", "n01751748")


# ------------------------------------------------------------------- helpers
def write_checkpoint(path, num_classes, bias=None, seed=0):
  """Tiny random Mixer in the released layout; zero head kernel, given head bias."""
  model = models.from_preset("S/4", num_classes, **TINY)
  shapes = weights.flatten(models.param_shapes(model, SIZE))
  rng = np.random.default_rng(seed)
  flat = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in shapes.items()}
  if num_classes:
    flat["head/kernel"] = np.zeros_like(flat["head/kernel"])
    flat["head/bias"] = np.zeros(num_classes, np.float32) if bias is None else bias
  weights.save_npz(weights.unflatten(flat), path)
  return path


def ranking_bias(num_classes, ranked):
  bias = np.zeros(num_classes, np.float32)
  bias[list(ranked)] = np.arange(len(ranked), 0, -1, dtype=np.float32) * 2.0
  return bias


def _jpeg(rng, shape=(12, 16, 3)):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_ilsvrc(manual_dir, num_val=NUM_VAL, per_synset=3, seed=0):
  """The two ImageNet tars in the layout of the files image-net.org distributes."""
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for synset in SYNSETS:
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        for i in range(per_synset):
          _add(inner, f"{synset}_{i + 1}.JPEG", _jpeg(rng))
      _add(outer, f"{synset}.tar", buf.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i in range(num_val):
      _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng))


def tfds_imagenet_val_labels(n):
  """Labels TFDS gives validation images 1..n: it zips the sorted tar member names with
  the first lines of its shipped validation_labels.txt (all 50,000 of them)."""
  import tensorflow_datasets as tfds
  root = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
  with open(os.path.join(root, "labels.txt")) as f:
    index = {s: i for i, s in enumerate(f.read().split())}
  with open(os.path.join(root, "validation_labels.txt")) as f:
    synsets = f.read().split()
  return np.array([index[s] for s in synsets[:n]])


def write_folder(root, num_classes, per_class, splits=("train", "validation"), seed=0):
  """Class-per-subfolder PNGs; class c is a noisy image of colour c (separable)."""
  rng = np.random.default_rng(seed)
  colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30],
                      [30, 230, 230]])
  for split in splits:
    for c in range(num_classes):
      d = os.path.join(root, split, f"class_{c}")
      os.makedirs(d, exist_ok=True)
      for i in range(per_class):
        img = np.clip(colours[c] + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i}.png"))
  return root


def config_for(dataset, **overrides):
  c = common.base_config()
  c.dataset = dataset
  c.eval_batch_size = 8
  c.batch_size = 8
  for k, v in overrides.items():
    c[k] = v
  return c


def run_evaluate(args, devices=1, timeout=180):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", "mixer_jax.evaluate", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------- headline: ImageNet
@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  d = tmp_path_factory.mktemp("imagenet")
  manual = str(d / "manual")
  write_ilsvrc(manual)
  labels = tfds_imagenet_val_labels(NUM_VAL)
  # Rank the five most frequent validation labels first (ties by label id).
  values, counts = np.unique(labels, return_counts=True)
  ranked = values[np.lexsort((values, -counts))][:5]
  bias = ranking_bias(1000, ranked)
  ckpt = write_checkpoint(str(d / "Mixer-tiny_1000.npz"), 1000, bias)
  logp = bias.astype(np.float64) - np.log(np.sum(np.exp(bias.astype(np.float64))))
  expected = {"num_examples": NUM_VAL,
              "top1": float(np.mean(labels == ranked[0])),
              "top5": float(np.mean(np.isin(labels, ranked))),
              "loss": float(-np.mean(logp[labels]))}
  assert 0 < expected["top1"] < expected["top5"] < 1  # A test that can fail.
  return dict(dir=d, manual=manual, data_dir=str(d / "tfds"), ckpt=ckpt, expected=expected)


def _check_imagenet_result(result, expected, devices):
  assert result["dataset"] == "imagenet2012" and result["split"] == "validation"
  assert result["num_examples"] == expected["num_examples"]
  assert result["devices"] == devices
  assert result["top1"] == pytest.approx(expected["top1"], abs=1e-9)
  assert result["top5"] == pytest.approx(expected["top5"], abs=1e-9)
  assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)


@pytest.mark.slow
def test_imagenet2012_exact_counts_1_and_8_devices(imagenet):
  common_args = [f"--checkpoint={imagenet['ckpt']}",
                 f"--config.data_dir={imagenet['data_dir']}",
                 f"--config.manual_dir={imagenet['manual']}"]
  # 1 device, batch 7: 5 batches, the last one 5/7 padding. Prepares the dataset.
  out = str(imagenet["dir"] / "eval1.json")
  r = run_evaluate(["--config=configs/finetune.py:imagenet2012", *common_args,
                    "--config.eval_batch_size=7", "--config.eval_preprocess=resize_crop",
                    f"--output={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = last_json(r.stdout)
  _check_imagenet_result(result, imagenet["expected"], devices=1)
  with open(out) as f:
    assert json.load(f) == result

  # TFDS prepared both splits from the tars, with the labels of its own label file.
  import tensorflow_datasets as tfds
  builder = tfds.builder("imagenet2012", data_dir=imagenet["data_dir"])
  assert builder.info.splits["train"].num_examples == 3 * len(SYNSETS)
  assert builder.info.splits["validation"].num_examples == NUM_VAL
  got = {ex["file_name"].decode(): int(ex["label"]) for ex in
         tfds.as_numpy(builder.as_dataset(split="validation"))}
  want = tfds_imagenet_val_labels(NUM_VAL)
  assert got == {f"ILSVRC2012_val_{i + 1:08d}.JPEG": int(want[i]) for i in range(NUM_VAL)}

  # 8 devices, batch 16 (2 per device): 2 batches, the last one 2/16 padding.
  r = run_evaluate(["--config=configs/default.py", "--config.dataset=imagenet2012",
                    *common_args, "--config.eval_batch_size=16"], devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  _check_imagenet_result(last_json(r.stdout), imagenet["expected"], devices=8)


def test_cli_error_is_one_sentence(imagenet, tmp_path):
  # A 10-class checkpoint on the 1000-class ImageNet: refused before preparing it.
  ckpt10 = write_checkpoint(str(tmp_path / "c10.npz"), 10)
  data_dir = str(tmp_path / "fresh_tfds")
  r = run_evaluate(["--config=configs/finetune.py:imagenet2012", f"--checkpoint={ckpt10}",
                    f"--config.data_dir={data_dir}", f"--config.manual_dir={imagenet['manual']}"])
  assert r.returncode == 2, r.stderr[-2000:]
  err = [l for l in r.stderr.strip().splitlines() if l.startswith("Error:")]
  assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "10-class head" in err[0] and "1000 classes" in err[0]
  assert not os.path.exists(os.path.join(data_dir, "imagenet2012", "5.1.0",
                                         "dataset_info.json"))


def test_errors_in_process(imagenet, tmp_path):
  ckpt = imagenet["ckpt"]
  # Unprepared TFDS datasets: what to do, not a traceback from TFDS.
  with pytest.raises(errors.DataError, match="not prepared"):
    evaluate.evaluate(config_for("imagenet_v2", data_dir=str(tmp_path)), ckpt)
  # ... with TFDS's default manual dir, DATA_DIR/downloads/manual, in the message.
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(errors.DataError, match=f"ILSVRC2012_img_train.tar.*{manual}"):
    evaluate.evaluate(config_for("imagenet2012", data_dir=str(tmp_path)), ckpt)
  # Another image size than the checkpoint's: names the allowed one.
  with pytest.raises(errors.CheckpointError, match=r"image size 8\b.*evaluate at 8"):
    evaluate.evaluate(config_for("imagenet2012", data_dir=imagenet["data_dir"]), ckpt,
                      image_size=16)
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    evaluate.evaluate(config_for("imagenet2012"), str(tmp_path / "missing"))
  # Class-count mismatch on a folder dataset (3 classes) and a features-only checkpoint.
  root = write_folder(str(tmp_path / "folder"), 3, 2)
  with pytest.raises(errors.CheckpointError, match="1000-class head but dataset folder:"):
    evaluate.evaluate(config_for(f"folder:{root}", eval_split="validation"), ckpt)
  features = write_checkpoint(str(tmp_path / "features.npz"), 0)
  with pytest.raises(errors.CheckpointError, match="no classification head"):
    evaluate.evaluate(config_for(f"folder:{root}", eval_split="validation"), features)


# ------------------------------------------------------------- ReaL labels
def _real_builder_class():
  import tensorflow_datasets as tfds

  class MixerTinyReal(tfds.core.GeneratorBasedBuilder):
    """imagenet2012_real's features on 6 classes: original_label + real_label list."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      label = tfds.features.ClassLabel(num_classes=6)
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "original_label": label,
          "real_label": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=6)),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i, (orig, real) in enumerate(REAL_EXAMPLES):
        yield i, {"image": io.BytesIO(_jpeg(rng)), "original_label": orig,
                  "real_label": list(real), "file_name": f"{i}.JPEG"}

  return MixerTinyReal


# (original label, ReaL labels): the checkpoint always predicts class 2.
REAL_EXAMPLES = [(2, [2]), (2, []), (1, [1, 2]), (0, [0]), (3, []), (4, [2, 4]), (5, [5]),
                 (2, [3])]


def test_imagenet2012_real_metric(tmp_path):
  builder = _real_builder_class()(data_dir=str(tmp_path))
  builder.download_and_prepare()
  ckpt = write_checkpoint(str(tmp_path / "c6.npz"), 6, ranking_bias(6, [2, 0, 1, 3, 4]))
  result = evaluate.evaluate(config_for("mixer_tiny_real", data_dir=str(tmp_path),
                                        eval_batch_size=3, eval_split="validation"), ckpt)
  with_real = [real for _, real in REAL_EXAMPLES if real]
  assert result["num_examples"] == len(REAL_EXAMPLES)  # Every image, ReaL labels or not.
  assert result["top1"] == pytest.approx(np.mean([o == 2 for o, _ in REAL_EXAMPLES]))
  # Only images with ReaL labels count; a hit is the top-1 being any of them.
  assert result["real_num_examples"] == len(with_real)
  assert result["real_top1"] == pytest.approx(np.mean([2 in r for r in with_real]))
  assert np.isfinite(result["loss"])


# ------------------------------------------------------------------ few-shot
def test_fewshot_on_folder_and_default_splits(tmp_path):
  root = write_folder(str(tmp_path / "colours"), 3, 12)
  ckpt = write_checkpoint(str(tmp_path / "c3.npz"), 3, ranking_bias(3, [1, 0, 2]))
  config = finetune.get_config(f"folder:{root}")
  assert (config.train_split, config.eval_split) == ("", "")  # The dataset's, at the start.
  config.eval_batch_size = 8
  result = evaluate.evaluate(config, ckpt, fewshot=True, confusion=True)
  assert (config.train_split, config.eval_split) == ("train", "validation")
  assert result["split"] == "validation" and result["num_examples"] == 36
  assert result["top1"] == pytest.approx(1 / 3)  # Always class 1.
  # So every example sits in column 1 of the confusion matrix.
  matrix = np.asarray(result["confusion"])
  assert matrix.shape == (3, 3) and matrix.sum() == 36
  assert np.all(matrix[:, [0, 2]] == 0) and np.all(matrix[:, 1] == 12)
  names = result["class_names"]
  assert result["class_top1"] == {names[0]: 0.0, names[1]: 1.0, names[2]: 0.0}
  assert [(m["true"], m["predicted"], m["count"], m["share_of_true"])
          for m in result["most_confused"]] == [(names[0], names[1], 12, 1.0),
                                                (names[2], names[1], 12, 1.0)]
  assert f"most confused (true -> predicted): {names[0]} -> {names[1]} 12 (100.00%)" in (
      evaluate.summary_line(result))
  assert result["top5"] is None  # Fewer than 5 classes.
  assert set(k for k in result if k.startswith("fewshot_")) == {
      "fewshot_1shot", "fewshot_5shot", "fewshot_10shot"}
  # Colour classes are linearly separable in the random features: few-shot finds it.
  assert result["fewshot_10shot"] >= 0.9, result
  assert all(0 <= result[f"fewshot_{n}shot"] <= 1 for n in (1, 5, 10))
  # Default splits: fixed ones for the ImageNet family, else config.eval_split.
  assert evaluate.default_split(config_for("imagenet2012")) == "validation"
  assert evaluate.default_split(config_for("imagenet_v2/matched-frequency")) == "test"
  assert evaluate.default_split(config_for("cifar10", eval_split="test[:50%]")) == "test[:50%]"


# --------------------------------------------------------------- class names
def test_class_names_that_differ_by_index_are_refused(caplog):
  check = lambda ckpt, data: evaluate.check_class_names("W", ckpt, "folder:/d", data)
  with pytest.raises(errors.CheckpointError, match=r"^Checkpoint W orders the same classes "
                     r"differently from dataset folder:/d \(label 0 is 'cat' in the checkpoint "
                     r"but 'dog' in the dataset\).*--format=npz.*evaluate that\.$"):
    check(["cat", "dog"], ["dog", "cat"])
  with pytest.raises(errors.CheckpointError, match="names other classes than .*label 1 is 'dog'"):
    check(["cat", "dog"], ["cat", "n02084071"])
  # Where it cannot be wrong: no names on one side, the same list, or one list extending
  # the other (a head wider than the dataset): at most a warning.
  check(None, ["cat"])
  check(["cat", "dog"], ["cat", "dog"])
  assert "compared by index" not in caplog.text
  check(["cat", "dog", "eel"], ["cat", "dog"])
  assert "the same ones where both name a label" in caplog.text
