"""Closed-form ridge few-shot evaluation."""

import numpy as np
import pytest

from mixer_jax import fewshot
from mixer_jax import errors


def _clusters(num_classes=10, per_class=40, dim=64, sep=3.0, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * sep
  labels = np.repeat(np.arange(num_classes), per_class)
  rng.shuffle(labels)
  feats = centres[labels] + rng.normal(size=(len(labels), dim))
  return feats.astype(np.float32), labels


def test_separable_clusters_high_accuracy():
  x, y = _clusters(seed=0)
  x_test, y_test = _clusters(seed=0, per_class=20)  # Same centres (same seed).
  rng = np.random.default_rng(1)
  x_test = x_test + rng.normal(size=x_test.shape).astype(np.float32) * 0.5
  accs = fewshot.fewshot_accuracy(x, y, x_test, y_test, 10)
  assert set(accs) == {1, 5, 10, 25}
  assert accs[5] > 0.95 and accs[10] > 0.95 and accs[25] > 0.95, accs
  assert accs[1] > 0.5, accs
  # Deterministic given the seed; features can be any float dtype.
  assert fewshot.fewshot_accuracy(x.astype(np.float64), y, x_test, y_test, 10) == accs


def test_random_labels_near_chance():
  x, _ = _clusters(seed=2)
  rng = np.random.default_rng(3)
  y = rng.integers(0, 10, len(x))
  x_test = rng.normal(size=(2000, x.shape[1]))
  y_test = rng.integers(0, 10, 2000)
  accs = fewshot.fewshot_accuracy(x, y, x_test, y_test, 10, shots=(5, 10), num_seeds=2)
  assert all(abs(a - 0.1) < 0.04 for a in accs.values()), accs


def test_indices_per_class_and_seed():
  y = np.array([0, 1, 2] * 10)
  idx = fewshot.fewshot_indices(y, 3, 4, seed=0)
  assert len(set(idx)) == 12 and np.bincount(y[idx]).tolist() == [4, 4, 4]
  np.testing.assert_array_equal(idx, fewshot.fewshot_indices(y, 3, 4, seed=0))
  assert not np.array_equal(idx, fewshot.fewshot_indices(y, 3, 4, seed=1))


def test_ridge_matches_both_forms():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(7, 3))
  for n, d in [(7, 4), (7, 12)]:  # N >= D and D > N branches.
    x = rng.normal(size=(n, d))
    w = fewshot.ridge_fit(x, y, 0.5)
    direct = np.linalg.solve(x.T @ x + 0.5 * np.eye(d), x.T @ y)
    np.testing.assert_allclose(w, direct, atol=1e-10)


def test_too_few_examples_is_one_sentence():
  x, y = _clusters(per_class=3)
  with pytest.raises(errors.DataError) as e:
    fewshot.fewshot_accuracy(x, y, x, y, 10, shots=(5,))
  msg = str(e.value)
  assert "only 3 training examples" in msg and "5 shots" in msg and msg.count(". ") == 0
  with pytest.raises(errors.DataError, match="labels must lie in"):
    fewshot.fewshot_accuracy(x, y, x, y, 5, shots=(1,))


def test_evaluator_over_batches():
  x, y = _clusters(per_class=30, seed=4)
  mask = np.ones(len(x), bool)
  batches = lambda: [{"image": x[i:i + 64], "label": y[i:i + 64], "mask": mask[i:i + 64]}
                     for i in range(0, len(x), 64)]
  ev = fewshot.FewShotEvaluator(lambda params, images: images * params,
                                {"toy": (batches, batches, 10)}, shots=(5,))
  out = ev.run(2.0)
  assert list(out) == ["fewshot/toy_5shot"] and out["fewshot/toy_5shot"] > 0.95
