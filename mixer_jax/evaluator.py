"""Evaluation during and after training: exact split metrics and few-shot probes.

`Evaluator` runs a whole split through a compiled eval step: every example exactly
once on any number of devices and processes (the last batch is padded with masked
examples, never dropped). `fewshot_metrics` fits fewshot.py's linear probes on frozen
pre-logits. Both read the data through input_pipeline.eval_dataset.
"""

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import fewshot
from mixer_jax import input_pipeline
from mixer_jax import sharding
from mixer_jax import steps


def summarize(sums: Dict[str, Any]) -> Dict[str, float]:
  """Per-example means from the eval step's sums."""
  sums = dict(jax.device_get(sums))
  confusion = sums.pop("confusion", None)
  sums = {k: float(v) for k, v in sums.items()}
  n = sums["num_examples"]
  out = {"loss": sums["loss"] / n, "accuracy": sums["accuracy"] / n, "num_examples": n}
  if "top5" in sums:
    out["top5"] = sums["top5"] / n
  if "real_accuracy" in sums:
    out["real_accuracy"] = sums["real_accuracy"] / max(sums["real_num_examples"], 1)
    out["real_num_examples"] = sums["real_num_examples"]
  if confusion is not None:
    out["confusion"] = np.rint(confusion).astype(np.int64)
  return out


def most_confused(confusion: np.ndarray, class_names=None, top: int = 5):
  """The `top` most frequent errors, as (true class, predicted class, count, share of
  the true class's examples), most frequent first."""
  confusion = np.asarray(confusion)
  names = list(class_names) if class_names else [str(i) for i in range(len(confusion))]
  per_class = np.maximum(confusion.sum(1), 1)
  errors = [(int(confusion[i, j]), i, j) for i in range(len(confusion))
            for j in range(len(confusion)) if i != j and confusion[i, j] > 0]
  errors.sort(key=lambda e: (-e[0], e[1], e[2]))
  return [(names[i], names[j], n, n / per_class[i]) for n, i, j in errors[:top]]


def _batches(source, config, split: str, num_classes: int, mesh, batch_size: int):
  """The split as global batches (padded, with a `mask`), this process's rows each."""
  ds, _ = input_pipeline.eval_dataset(source, config, split,
                                      batch_size // jax.process_count(), num_classes,
                                      jax.process_index(), jax.process_count())
  for batch in ds.as_numpy_iterator():
    yield sharding.global_batch(batch, mesh)


class Evaluator:
  """A compiled eval step (state.Setup.eval_step) over one split."""

  def __init__(self, eval_step, config, source, split: str, num_classes: int, mesh,
               batch_size: int):
    self._step = eval_step
    self._batches = lambda: _batches(source, config, split, num_classes, mesh, batch_size)

  def __call__(self, params) -> Dict[str, float]:
    total = None
    for batch in self._batches():
      sums = self._step(params, batch)
      total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    return summarize(total)


def fewshot_metrics(feature_model, params, config, source, train_split: str, test_split: str,
                    num_classes: int, mesh, batch_size: int) -> Dict[str, float]:
  """fewshot.fewshot_accuracy on pre-logits of train_split vs test_split.

  `feature_model` is the model built with num_classes=0 (pooled pre-logits) and
  `params` its parameters (the head left out).
  """
  def features(p, batch):
    images = steps.to_model_range(batch["image"])  # uint8 from the pipeline.
    return feature_model.apply({"params": p}, images, train=False), batch["label"], \
        batch["mask"]
  # Replicated outputs: every process sees the whole global batch's features.
  features = jax.jit(features, out_shardings=sharding.replicated(mesh))

  def extract(split):
    feats, labels = [], []
    for batch in _batches(source, config, split, num_classes, mesh, batch_size):
      f, y, m = jax.device_get(features(params, batch))
      keep = np.asarray(m) > 0  # Padding out.
      feats.append(np.asarray(f)[keep])
      labels.append(np.asarray(y)[keep])
    return np.concatenate(feats), np.concatenate(labels)

  x, y = extract(train_split)
  x_test, y_test = extract(test_split)
  accs = fewshot.fewshot_accuracy(x, y, x_test, y_test, num_classes,
                                  shots=tuple(config.fewshot_shots), seed=config.seed)
  return {f"fewshot_{n}shot": a for n, a in accs.items()}
