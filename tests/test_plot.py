"""plot.py: a workdir's metrics.jsonl to a PNG, and one sentence for unusable input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from mixer_jax import errors
from mixer_jax.tools import plot


def _write_metrics(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(workdir)


def _run(seed):
  rows = []
  for step in range(100, 1001, 100):
    rows.append({"step": step, "train/loss": 2.0 / step ** 0.3 + seed * 0.01,
                 "train/accuracy": 1 - 1.0 / step ** 0.3})
    if step % 500 == 0:
      rows.append({"step": step, "eval/loss": 1.5 / step ** 0.3, "eval/accuracy": 0.9,
                   "eval/num_examples": 10000})
  return rows


def test_plot_writes_a_png_of_several_runs(tmp_path):
  a = _write_metrics(tmp_path / "seed0", _run(0))
  b = _write_metrics(tmp_path / "seed1", _run(1) + [{"step": 1000, "eval/accuracy": 0.95}])
  assert plot.read_metrics(b)["eval/accuracy"][-1] == (1000, 0.95)  # A step logged twice.
  out = str(tmp_path / "figs" / "curves.png")
  plot.plot([a, b], out, title="two seeds")
  with Image.open(out) as image:
    assert image.format == "PNG" and image.size == (1100, 400)
    pixels = np.asarray(image.convert("RGB"))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # Something was drawn.


def test_plot_input_errors_are_one_sentence(tmp_path):
  with pytest.raises(errors.WorkdirError, match="has no metrics.jsonl"):
    plot.read_metrics(str(tmp_path))
  bad = _write_metrics(tmp_path / "bad", [{"step": 1, "train/loss": 1.0}])
  with open(os.path.join(bad, "metrics.jsonl"), "a") as f:
    f.write('{"step": 2, "train/lo\n')
  with pytest.raises(errors.WorkdirError, match="line 2 is not a metrics row"):
    plot.read_metrics(bad)
  empty = _write_metrics(tmp_path / "empty", [{"step": 1, "train/grad_norm": 1.0}])
  with pytest.raises(errors.WorkdirError, match="no train or eval loss/accuracy"):
    plot.plot([empty], str(tmp_path / "x.png"))


def test_plot_command_resolves_paths_as_typed(tmp_path):
  """`~` and relative paths mean what the shell user meant, as in every entry point."""
  home = tmp_path / "home"
  _write_metrics(home / "runs" / "seed0", _run(0))
  env = dict(os.environ, HOME=str(home), PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-m", "mixer_jax.tools.plot", "--workdir=~/runs/seed0",
                         "--out=figs/curves.png"], cwd=str(home / "runs"), env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  written = home / "runs" / "figs" / "curves.png"
  assert written.is_file() and done.stdout.strip() == f"Wrote {written}"


def test_plot_writes_exactly_the_out_name(tmp_path):
  # Without an extension the PNG is written under that very name (savefig alone would
  # write FILE.png while the tool said it wrote FILE); a known extension picks its format.
  run = _write_metrics(tmp_path / "seed0", _run(0))
  plot.plot([run], str(tmp_path / "curves"))
  assert os.listdir(tmp_path) == ["seed0", "curves"] or sorted(os.listdir(tmp_path)) == [
      "curves", "seed0"]
  with Image.open(tmp_path / "curves") as image:
    assert image.format == "PNG"
  plot.plot([run], str(tmp_path / "curves.pdf"))
  assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"
