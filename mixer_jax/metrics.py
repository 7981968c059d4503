"""Metric writers: clu (TensorBoard events + log lines) and `metrics.jsonl`.

Only process 0 writes; other processes get a writer that drops everything, so the
loop can call it unconditionally.
"""

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
from clu import metric_writers


class MetricWriter:
  """Writes scalars to TensorBoard, the log and `WORKDIR/metrics.jsonl`."""

  def __init__(self, workdir: str):
    self.is_writer = jax.process_index() == 0
    self._clu = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=False)
    self._jsonl = None
    if self.is_writer:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  @property
  def clu_writer(self) -> metric_writers.MetricWriter:
    return self._clu

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: _to_float(v) for k, v in scalars.items()}
    self._clu.write_scalars(step, scalars)
    if self._jsonl is not None:
      # NaN/inf are not JSON: write them as strings so a diverged step stays visible.
      row = {"step": int(step)}
      row.update({k: v if math.isfinite(v) else str(v) for k, v in scalars.items()})
      self._jsonl.write(json.dumps(row) + "\n")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    self._clu.write_images(step, images)

  def flush(self) -> None:
    self._clu.flush()

  def close(self) -> None:
    self._clu.close()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def _to_float(x) -> float:
  return float(np.asarray(x))


def image_grid(images: np.ndarray, max_images: int = 64) -> np.ndarray:
  """(N, H, W, 3) images in [-1, 1] -> one (1, rows*H, cols*W, 3) uint8 grid."""
  images = np.asarray(images[:max_images], np.float32)
  n, h, w, c = images.shape
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  pixels = np.clip((images + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = pixels[i]
  return grid[None]
