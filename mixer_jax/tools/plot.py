r"""Plots the train/eval curves of one or more workdirs' `metrics.jsonl` to a PNG.

  python -m mixer_jax.tools.plot --workdir=/tmp/fmnist --out=/tmp/fmnist/curves.png
  python -m mixer_jax.tools.plot --workdir=/tmp/fm_s0,/tmp/fm_s1,/tmp/fm_s2 \
      --out=docs/fashion_mnist_curves.png --title="Mixer on Fashion-MNIST"

Two panels against the training step: loss (train, eval) and top-1 accuracy (train,
eval). Each workdir is one colour, labelled by its directory name. Train accuracy is
on the augmented (and mixed, with mixup) batches, so it may sit below eval.
"""

import json
import os
from typing import Dict, List, Sequence

from absl import app
from absl import flags

from mixer_jax import errors
from mixer_jax import paths

CURVES = (("loss", "train/loss", "eval/loss"), ("top-1 accuracy", "train/accuracy",
                                                "eval/accuracy"))


def read_metrics(workdir: str) -> Dict[str, List]:
  """{metric name: [(step, value), ...]} from WORKDIR/metrics.jsonl, in step order.

  A resumed run appends to the file; for a step logged twice the last row wins."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise errors.WorkdirError(f"{workdir} has no metrics.jsonl; pass the workdir of a "
                              "training run (python -m mixer_jax.main --workdir=...).")
  series: Dict[str, Dict[int, float]] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = int(row.pop("step"))
      except (ValueError, KeyError, TypeError):
        raise errors.WorkdirError(f"{path} line {number} is not a metrics row ({line[:60]!r}); "
                                  "the file was edited or truncated, remove that line.") from None
      for name, value in row.items():
        series.setdefault(name, {})[step] = float(value)
  return {name: sorted(points.items()) for name, points in series.items()}


def plot(workdirs: Sequence[str], out: str, title: str = "") -> None:
  # Imported here: choosing the Agg backend is process-wide, and importing this module
  # (read_metrics) must not change it for the program that imports it.
  import matplotlib
  matplotlib.use("Agg")  # Files only; no display needed.
  import matplotlib.pyplot as plt

  runs = [(os.path.basename(os.path.normpath(w)), read_metrics(w)) for w in workdirs]
  if not any(k in metrics for _, metrics in runs for _, *keys in CURVES for k in keys):
    raise errors.WorkdirError(f"{', '.join(workdirs)}: metrics.jsonl holds no train or eval "
                              "loss/accuracy yet; plot after the first log step.")
  fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 4), dpi=100)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (label, train_key, eval_key) in zip(axes, CURVES):
    for i, (name, metrics) in enumerate(runs):
      colour = colours[i % len(colours)]
      for key, style, kind in ((train_key, "-", "train"), (eval_key, "o-", "eval")):
        if key in metrics:
          steps, values = zip(*metrics[key])
          ax.plot(steps, values, style, color=colour, markersize=3,
                  alpha=0.45 if kind == "train" else 1.0, label=f"{name} {kind}")
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    if label == "loss":
      ax.set_yscale("log")
  axes[-1].legend(fontsize=7, loc="lower right")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  # Exactly `out`: its extension picks a format matplotlib writes (pdf, svg, ...); with
  # none, or one matplotlib does not know, it is a PNG under that very name (savefig
  # alone would append ".png" to a name without an extension).
  ext = os.path.splitext(out)[1][1:].lower()
  fmt = ext if ext in fig.canvas.get_supported_filetypes() else "png"
  fig.savefig(out, format=fmt)
  plt.close(fig)


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list("workdir", None, "Training workdir(s), comma-separated.")
  flags.DEFINE_string("out", None, "Image file to write, exactly this name (PNG unless its "
                      "extension names another format matplotlib writes, e.g. .pdf, .svg).")
  flags.DEFINE_string("title", "", "Figure title.")


def main(argv):
  if len(argv) > 1:
    raise errors.usage(f"Unexpected arguments: {' '.join(argv[1:])}")

  def run():
    if not FLAGS.workdir or not FLAGS.out:
      raise errors.WorkdirError("Pass --workdir=DIR[,DIR...] and --out=FILE.png.")
    out = paths.resolve(FLAGS.out)
    plot([paths.resolve(w) for w in FLAGS.workdir], out, FLAGS.title)
    print(f"Wrote {out}")

  errors.run_guarded(run)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
