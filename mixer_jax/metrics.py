"""Metric writers: clu (TensorBoard events + log lines) and `metrics.jsonl`.

Only process 0 writes; other processes get a writer that drops everything, so the
loop can call it unconditionally.
"""

import contextlib
import json
import math
import os
import time
from typing import Dict, Mapping

import jax
import numpy as np
from absl import logging
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
  """(N, H, W, 3) uint8 images (the input pipeline's) -> one (1, rows*H, cols*W, 3) uint8
  grid."""
  pixels = np.asarray(images[:max_images], np.uint8)
  n, h, w, c = pixels.shape
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = pixels[i]
  return grid[None]


class Progress:
  """Logs `step s/N (p%), r steps/s, ETA t` every `every_steps` steps and at the end.

  The rate counts training time only: `paused()` wraps evaluation and checkpointing,
  and the first step (compilation) is excluded, so the ETA is meaningful from the first
  report of a short run on.
  """

  def __init__(self, total_steps: int, every_steps: int):
    self.total, self.every = total_steps, every_steps
    self._start_step = self._start_time = None
    self._paused = 0.0

  @contextlib.contextmanager
  def paused(self):
    t = time.monotonic()
    try:
      yield
    finally:
      self._paused += time.monotonic() - t

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._start_step is None:  # After the first step: compilation is behind us.
      self._start_step, self._start_time = step, now
      return
    if step % self.every and step != self.total:
      return
    rate = (step - self._start_step) / max(now - self._start_time - self._paused, 1e-9)
    eta = (self.total - step) / rate
    logging.info("step %d/%d (%.0f%%), %.2f steps/s, ETA %s", step, self.total,
                 100 * step / self.total, rate, format_seconds(eta))


def format_seconds(seconds: float) -> str:
  """12 -> '12s', 125 -> '2m05s', 7300 -> '2h01m'."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def last_eval(workdir: str) -> Dict[str, float]:
  """The last evaluation in `WORKDIR/metrics.jsonl` ({} if none), keys without 'eval/'."""
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # A line cut short by a killed run.
        found = {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}
        last = found or last
  return last
