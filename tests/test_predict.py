"""predict CLI: top-k ordering, probabilities, class names, unreadable-image error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mixer_jax import models, predict, weights
from mixer_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=4, num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


def _write_checkpoint(path, num_classes, seed=0):
  model = models.from_preset("S/4", num_classes, **TINY)
  shapes = weights.flatten(models.param_shapes(model, 8))
  rng = np.random.default_rng(seed)
  flat = {k: (1.0 if k.endswith("scale") else 0.0) + rng.normal(size=s.shape).astype(np.float32)
          for k, s in shapes.items()}
  weights.save_npz(weights.unflatten(flat), path)
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("predict")
  rng = np.random.default_rng(0)
  png, jpg = str(d / "a.png"), str(d / "b.jpg")
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(png)
  Image.fromarray(rng.integers(0, 256, (17, 9), dtype=np.uint8), mode="L").save(jpg)  # Gray.
  bad = d / "bad.jpg"
  bad.write_bytes(b"not an image at all")
  return dict(dir=d, png=png, jpg=jpg, bad=str(bad),
              ckpt10=_write_checkpoint(str(d / "c10.npz"), 10),
              ckpt1000=_write_checkpoint(str(d / "c1000.npz"), 1000, seed=1))


def test_predict_top_k(files):
  result = predict.predict(files["ckpt10"], [files["png"], files["jpg"]], top_k=3)
  preds = result["predictions"]
  assert [p["image"] for p in preds] == [files["png"], files["jpg"]]
  for p in preds:
    probs = [e["prob"] for e in p["top_k"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-9
    assert all(e["name"] == f"class_{e['label']}" for e in p["top_k"])
  # Top-k larger than the class count is clamped; all probabilities then sum to 1.
  full = predict.predict(files["ckpt10"], [files["png"]], top_k=50)["predictions"][0]["top_k"]
  assert len(full) == 10 and abs(sum(e["prob"] for e in full) - 1) < 1e-6
  assert [e["label"] for e in full[:3]] == [e["label"] for e in preds[0]["top_k"]]
  np.testing.assert_allclose([e["prob"] for e in full[:3]],
                             [e["prob"] for e in preds[0]["top_k"]], rtol=1e-5)


def test_imagenet_names():
  names = predict.imagenet_class_names()
  assert names is not None and len(names) == 1000
  # Human-readable if TFDS ships them, else WordNet synsets; both in TFDS label order.
  assert names[0].startswith("tench") or names[0] == "n01440764"
  assert predict.class_names({"class_names": ["x", "y"]}, 2) == ["x", "y"]
  assert predict.class_names({"class_names": None}, 3) == ["class_0", "class_1", "class_2"]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "mixer_jax.predict", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_json_and_imagenet_names(files):
  r = _run(f"--checkpoint={files['ckpt1000']}", "--top_k=2", files["png"], files["jpg"])
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.strip().splitlines()[-1])
  names = predict.imagenet_class_names()
  assert len(result["predictions"]) == 2
  for p in result["predictions"]:
    assert len(p["top_k"]) == 2 and p["top_k"][0]["prob"] >= p["top_k"][1]["prob"]
    assert all(e["name"] == names[e["label"]] for e in p["top_k"])
  assert result == predict.predict(files["ckpt1000"], [files["png"], files["jpg"]], top_k=2)


def test_cli_unreadable_image(files):
  r = _run(f"--checkpoint={files['ckpt10']}", files["png"], files["bad"])
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  # TensorFlow's C++ start-up lines (absl, oneDNN) come first; ours is one line.
  err = [l for l in r.stderr.strip().splitlines() if files["bad"] in l]
  assert len(err) == 1 and err[0].startswith("Cannot read image"), r.stderr
  with pytest.raises(errors.DataError, match="missing.png"):
    predict.predict(files["ckpt10"], [str(files["dir"] / "missing.png")])
  with pytest.raises(errors.CheckpointError, match="image_size=16"):
    predict.predict(files["ckpt10"], [files["png"]], image_size=16)


def _odd_files(d):
  """Files whose decode differs between PIL's convert("RGB") and tf.io.decode_image, or
  that need a conversion: 16-bit grey, palette, grey + alpha, CMYK, EXIF-rotated."""
  import io as io_lib
  rng = np.random.default_rng(3)
  out = {}
  grey16 = (rng.integers(0, 65536, (12, 10))).astype(np.uint16)
  out["grey16"] = str(d / "grey16.png")
  Image.fromarray(grey16).save(out["grey16"])
  rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
  out["palette"] = str(d / "palette.png")
  rgb.convert("P").save(out["palette"])
  out["grey_alpha"] = str(d / "la.png")
  Image.fromarray(rng.integers(0, 256, (12, 10, 2), dtype=np.uint8), "LA").save(out["grey_alpha"])
  out["cmyk"] = str(d / "cmyk.jpg")
  rgb.convert("CMYK").save(out["cmyk"])
  out["exif"] = str(d / "exif.jpg")
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  rgb.save(out["exif"], exif=exif)
  del io_lib
  return out


def test_every_entry_point_decodes_alike(tmp_path):
  """train, evaluate and predict turn a file into the same pixels (issue 31: a 16-bit
  PNG was white under predict's PIL decode and scaled under the pipelines')."""
  import ml_collections
  import tensorflow as tf
  from mixer_jax import input_pipeline
  from mixer_jax.datasets.folder import FolderSource
  size = 8
  odd = _odd_files(tmp_path)
  config = ml_collections.ConfigDict(dict(
      image_size=size, eval_preprocess="resize", eval_crop_fraction=0.875,
      train_crop="resize", train_crop_padding=0, train_flip=False, randaugment_layers=0,
      randaugment_magnitude=0))
  for name, path in odd.items():
    predicted = predict.load_image(path, size)
    with open(path, "rb") as f:
      example = {"image": tf.constant(f.read()), "label": tf.constant(0, tf.int64)}
    # The pipelines ship uint8; the steps scale it as predict does.
    scaled = lambda out: out["image"].numpy().astype(np.float32) / 127.5 - 1.0
    evaluated = scaled(input_pipeline.preprocess_eval(example, config, 1))
    trained = scaled(input_pipeline.preprocess_train(example, tf.constant([1, 2], tf.int32),
                                                     config, 1))
    np.testing.assert_array_equal(predicted, evaluated, err_msg=name)
    np.testing.assert_array_equal(predicted, trained, err_msg=name)
  # The 16-bit file is its own grey levels (v / 257), not white.
  grey16 = np.asarray(Image.open(odd["grey16"]), np.float64)
  pixels = predict.decode.load_rgb(odd["grey16"])
  np.testing.assert_allclose(pixels[..., 0], np.round(grey16 / 257), atol=1)
  assert pixels.min() < 200
  # A folder dataset's records decode to the same pixels as predict's files.
  for cls in ("a", "b"):
    (tmp_path / "folder" / cls).mkdir(parents=True)
  os.link(odd["grey16"], tmp_path / "folder" / "a" / "grey16.png")
  os.link(odd["cmyk"], tmp_path / "folder" / "b" / "cmyk.jpg")
  source = FolderSource(str(tmp_path / "folder"))
  for record in source.as_dataset("train"):
    path = record["path"].numpy().decode()
    np.testing.assert_array_equal(input_pipeline.decode.decode_rgb(record["image"]).numpy(),
                                  predict.decode.load_rgb(path))


def test_predict_refuses_a_decompression_bomb(tmp_path, monkeypatch):
  path = str(tmp_path / "big.png")
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(path)
  monkeypatch.setattr(predict.decode, "MAX_PIXELS", 1000)
  with pytest.raises(errors.DataError) as e:
    predict.load_image(path, 8)
  assert str(e.value) == (f"Image {path} is too large (50 x 40 pixels, more than 1,000); "
                          "resize it before predicting.")
