"""predict CLI: top-k ordering, probabilities, class names, unreadable-image error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mixer_jax import checkpoint, models, predict
from mixer_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=4, num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


def _write_checkpoint(path, num_classes, seed=0):
  model = models.from_preset("S/4", num_classes, **TINY)
  shapes = checkpoint.flatten(models.param_shapes(model, 8))
  rng = np.random.default_rng(seed)
  flat = {k: (1.0 if k.endswith("scale") else 0.0) + rng.normal(size=s.shape).astype(np.float32)
          for k, s in shapes.items()}
  checkpoint.save_npz(checkpoint.unflatten(flat), path)
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
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and files["bad"] in err[0] and "Cannot read image" in err[0]
  with pytest.raises(errors.PredictError, match="missing.png"):
    predict.predict(files["ckpt10"], [str(files["dir"] / "missing.png")])
  with pytest.raises(errors.PredictError, match="image_size=16"):
    predict.predict(files["ckpt10"], [files["png"]], image_size=16)
