"""Few-shot linear evaluation on frozen pre-logits, closed-form ridge regression.

This follows big_vision's `fewshot_lsr` evaluator (used for the MLP-Mixer paper's
few-shot numbers): for each shot count n, take n training examples per class, fit an
L2-regularised least-squares map from features to one-hot targets in {-1, +1}, and
report the top-1 accuracy of its argmax on the test features.

Details (big_vision's choices):
- Few-shot subset: for every class, `shots` examples drawn without replacement by a
  NumPy generator seeded with `seed` (the same seed gives the same subset).
- Features are standardised with the few-shot subset's own statistics: centred by its
  mean and divided by its per-dimension standard deviation (+1e-5); the test features
  get the same transform.
- A constant feature of value 100 is appended as the bias; its weight is then almost
  unregularised.
- `l2_reg` defaults to 2**10 = 1024, the default of big_vision's standard few-shot
  config (`configs/common_fewshot.py`: shots (1, 5, 10, 25), l2_reg 2.0 ** 10,
  3 seeds). It acts on standardised features (unit variance per dimension), so it
  does not depend on the feature scale; it is fixed, not tuned per dataset, so treat
  the numbers as a cheap representation probe rather than the best linear classifier.
- Solved in float64 with NumPy: (X^T X + l2 I) W = X^T Y when there are at least as
  many examples as dimensions, else the equivalent W = X^T (X X^T + l2 I)^-1 Y.

`fewshot_accuracy` is a pure function of features; `FewShotEvaluator` wraps it with
a feature extractor so training / evaluation code can call it on a parameter tree.
"""

from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np

from mixer_jax import errors

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0 ** 10
BIAS_CONSTANT = 100.0


def _as_labels(labels, num_classes: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise errors.DataError(f"{what} labels must be a 1-D integer array, got shape "
                       f"{labels.shape} and dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.DataError(f"{what} labels must lie in [0, {num_classes}), got values from "
                       f"{labels.min()} to {labels.max()}.")
  return labels


def fewshot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """`shots` indices per class (class-major order), deterministic given `seed`."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  idx = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise errors.DataError(
          f"Class {c} has only {len(members)} training examples, fewer than the {shots} "
          "shots requested; lower the shot count or use a larger training split.")
    idx.append(rng.choice(members, size=shots, replace=False))
  return np.concatenate(idx)


def ridge_fit(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_W |xW - y|^2 + l2_reg |W|^2, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
  return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)


def _standardise(train: np.ndarray, test: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  mean = train.mean(axis=0, keepdims=True)
  std = train.std(axis=0, keepdims=True) + 1e-5
  bias = lambda z: np.pad((z - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
  return bias(train), bias(test)


def fewshot_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                     shots: Sequence[int] = DEFAULT_SHOTS, l2_reg: float = DEFAULT_L2_REG,
                     seed: int = 0, num_seeds: int = 1) -> Dict[int, float]:
  """Ridge-regression few-shot accuracy for each shot count.

  Args:
    train_feats: (N, D) features of the pool the few-shot examples are drawn from.
    train_labels: (N,) integer labels in [0, num_classes).
    test_feats, test_labels: (M, D) and (M,) evaluation set.
    num_classes: number of classes.
    shots: examples per class to train on, one result per entry.
    l2_reg: ridge regularisation (see module doc; big_vision's default 2**10).
    seed: seed of the per-class example choice.
    num_seeds: average over seeds seed, seed+1, ... (big_vision uses 3); 1 by default.

  Returns:
    {shots: test accuracy in [0, 1]}.

  Raises:
    errors.DataError: a class has fewer training examples than `shots`, or bad shapes.
  """
  train_feats = np.asarray(train_feats, np.float64)
  test_feats = np.asarray(test_feats, np.float64)
  if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
    raise errors.DataError(f"Features must be (N, D) and (M, D) arrays, got shapes "
                       f"{train_feats.shape} and {test_feats.shape}.")
  train_labels = _as_labels(train_labels, num_classes, "Training")
  test_labels = _as_labels(test_labels, num_classes, "Test")
  if len(train_labels) != len(train_feats) or len(test_labels) != len(test_feats):
    raise errors.DataError("Features and labels must have the same number of rows, got "
                       f"{len(train_feats)}/{len(train_labels)} (train) and "
                       f"{len(test_feats)}/{len(test_labels)} (test).")
  if not len(test_labels):
    raise errors.DataError("The test set is empty; few-shot accuracy needs test examples.")
  results = {}
  for n in shots:
    if int(n) < 1:
      raise errors.ConfigError(f"Shot count {n} must be at least 1.")
    accs = []
    for s in range(seed, seed + num_seeds):
      idx = fewshot_indices(train_labels, num_classes, int(n), s)
      x, x_test = _standardise(train_feats[idx], test_feats)
      y = 2.0 * np.eye(num_classes)[train_labels[idx]] - 1.0
      w = ridge_fit(x, y, l2_reg)
      accs.append(float(np.mean(np.argmax(x_test @ w, axis=1) == test_labels)))
    results[int(n)] = float(np.mean(accs))
  return results


Batch = Any  # (images, labels) or {"image": ..., "label": ..., optional "mask": ...}.


def extract_features(features_fn: Callable[[np.ndarray], Any],
                     batches: Iterable[Batch]) -> Tuple[np.ndarray, np.ndarray]:
  """Runs `features_fn(images) -> (B, D)` over batches; drops padding (mask == 0)."""
  feats, labels = [], []
  for batch in batches:
    if isinstance(batch, Mapping):
      images, y = batch["image"], batch["label"]
      mask = batch.get("mask", batch.get("_mask"))
    else:
      (images, y), mask = batch, None
    f, y = np.asarray(features_fn(images)), np.asarray(y)
    if mask is not None:
      keep = np.asarray(mask).astype(bool)
      f, y = f[keep], y[keep]
    feats.append(f.reshape(len(f), -1))
    labels.append(y)
  if not feats:
    raise errors.DataError("No batches to extract features from.")
  return np.concatenate(feats), np.concatenate(labels)


class FewShotEvaluator:
  """Few-shot accuracies of a feature extractor on named datasets.

  Args:
    features_fn: (params, images) -> (B, D) pre-logits, e.g. a jitted
      `create_model(..., num_classes=0).apply({"params": p}, x)`; it gets the images as
      the batches hold them (the input pipelines' are uint8: it scales them to [-1, 1],
      as evaluator.fewshot_metrics does with steps.to_model_range).
    datasets: name -> (make_train_batches, make_test_batches, num_classes), where each
      `make_*` is a zero-argument callable returning an iterable of batches
      ((images, labels) or dicts with "image", "label" and optional "mask").
    shots, l2_reg, seed, num_seeds: as in `fewshot_accuracy`.
  """

  def __init__(self, features_fn: Callable[[Any, np.ndarray], Any],
               datasets: Mapping[str, Tuple[Callable[[], Iterable[Batch]],
                                            Callable[[], Iterable[Batch]], int]],
               shots: Sequence[int] = DEFAULT_SHOTS, l2_reg: float = DEFAULT_L2_REG,
               seed: int = 0, num_seeds: int = 1):
    self.features_fn = features_fn
    self.datasets = dict(datasets)
    self.shots, self.l2_reg, self.seed, self.num_seeds = tuple(shots), l2_reg, seed, num_seeds

  def run(self, params, prefix: str = "fewshot") -> Dict[str, float]:
    """{f"{prefix}/{name}_{n}shot": accuracy} for every dataset and shot count."""
    fn = lambda images: self.features_fn(params, images)
    out = {}
    for name, (make_train, make_test, num_classes) in self.datasets.items():
      x, y = extract_features(fn, make_train())
      x_test, y_test = extract_features(fn, make_test())
      accs = fewshot_accuracy(x, y, x_test, y_test, num_classes, self.shots, self.l2_reg,
                              self.seed, self.num_seeds)
      out.update({f"{prefix}/{name}_{n}shot": a for n, a in accs.items()})
    return out
