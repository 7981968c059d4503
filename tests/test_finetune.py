"""configs/finetune.py and fine-tuning end to end from a tiny released-layout `.npz`.

The end-to-end test fine-tunes a 10-class checkpoint on a generated 3-class folder
dataset and checks, against an independent computation, that the checkpoints after
steps 1 and 2 are the `.npz` (head re-initialised to zeros) plus one and two clipped
momentum-SGD steps; then that `evaluate` on the workdir reproduces the trainer's own
final evaluation.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import finetune
from mixer_jax import checkpoint, evaluate, input_pipeline, models, train
from test_evaluate import SIZE, TINY, write_checkpoint, write_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipe_per_dataset(tmp_path):
  expected = {"imagenet2012": ("train", "validation", 20_000, 500),
              "cifar10": ("train", "test", 10_000, 500),
              "cifar100": ("train", "test", 10_000, 500),
              "oxford_iiit_pet": ("train", "test", 500, 100),
              "oxford_flowers102": ("train", "test", 500, 100)}
  for name, (train_split, eval_split, steps, warmup) in expected.items():
    c = finetune.get_config(name)
    train.validate_config(c)
    assert (c.dataset, c.train_split, c.eval_split) == (name, train_split, eval_split)
    assert (c.num_train_steps, c.warmup_steps) == (steps, warmup)
    # Paper Appendix B.
    assert (c.optimizer, c.momentum, c.batch_size, c.grad_clip_norm) == ("sgd", 0.9, 512, 1.0)
    assert (c.lr_decay, c.weight_decay, c.learning_rate) == ("cosine", 0.0, 0.03)
    assert (c.image_size, c.train_crop, c.train_flip) == (224, "inception", True)
    assert c.randaugment_layers == 0 and c.mixup_alpha == 0 and c.model.stoch_depth == 0
  # Folders: split subfolders when present, else a 90/10 slice of the images.
  (tmp_path / "with" / "val").mkdir(parents=True)
  (tmp_path / "test_only" / "test").mkdir(parents=True)
  (tmp_path / "flat" / "cat").mkdir(parents=True)
  for sub, splits in (("with", ("train", "validation")), ("test_only", ("train", "test")),
                      ("flat", ("train[:90%]", "train[90%:]"))):
    c = finetune.get_config(f"folder:{tmp_path / sub}")
    assert (c.train_split, c.eval_split) == splits
  with pytest.raises(ValueError, match="Unknown fine-tuning dataset 'mnist'"):
    finetune.get_config("mnist")


def test_command_line_argument_with_colon(tmp_path, monkeypatch):
  """`--config=configs/finetune.py:folder:/path`: everything after the first colon."""
  argv = ["prog", f"--config={REPO}/configs/finetune.py:folder:{tmp_path}",
          "--config.init_from=Mixer-B_16.npz", "--config.learning_rate=0.01"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from there.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
  flag_values(argv)
  c = flag_values.config
  assert c.dataset == f"folder:{tmp_path}" and c.init_from == "Mixer-B_16.npz"
  assert c.learning_rate == 0.01 and c.eval_split == "train[90%:]"


def test_load_pretrained_reinitialises_head(tmp_path):
  npz = checkpoint.load_npz(write_checkpoint(str(tmp_path / "c10.npz"), 10,
                                             bias=np.arange(10, dtype=np.float32)))
  model = models.create_model("S/4", 3, **TINY)
  fresh = models.init_params(model, SIZE, jax.random.key(1))
  merged = checkpoint.flatten(checkpoint.load_pretrained(fresh, npz, source="c10.npz"))
  pre = checkpoint.flatten(npz)
  assert merged["head/kernel"].shape == (TINY["hidden_dim"], 3)
  assert not np.any(merged["head/kernel"]) and not np.any(merged["head/bias"])
  assert set(merged) == set(pre)
  for k in merged:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(merged[k], pre[k])


def _finetune_config(root, npz, **overrides):
  c = finetune.get_config(f"folder:{root}")
  for k, v in TINY.items():
    c.model[k] = v
  c.init_from = npz
  c.image_size = SIZE
  c.batch_size = 8
  c.num_train_steps = 2
  c.warmup_steps = 0  # The first step then uses the full learning rate.
  c.checkpoint_every_steps = 1
  c.eval_every_steps = 2
  c.log_every_steps = 1
  c.shuffle_buffer = 64
  for k, v in overrides.items():
    c[k] = v
  return c


def test_finetune_end_to_end(tmp_path):
  root = write_folder(str(tmp_path / "data"), 3, 8)
  npz_path = write_checkpoint(str(tmp_path / "Mixer-tiny_10.npz"), 10,
                              bias=np.linspace(-1, 1, 10).astype(np.float32))
  config = _finetune_config(root, npz_path)
  workdir = str(tmp_path / "work")
  final = train.train_and_evaluate(config, workdir)

  # Independent reference: the trainer's first two batches, the .npz with a fresh zero
  # head, and two clipped momentum-SGD steps written out by hand.
  source = input_pipeline.get_source(config)
  batches = iter(input_pipeline.train_dataset(source, config, 8, 3, 0, 1))
  model = models.create_model("S/4", 3, **TINY)

  def clipped_grads(flat_params):
    batch = input_pipeline.to_numpy(next(batches))

    def loss(p):
      logits = model.apply({"params": p}, batch["image"], train=False)
      return optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], 3)).mean()

    grads = checkpoint.flatten(jax.device_get(jax.grad(loss)(checkpoint.unflatten(
        {k: jnp.asarray(v) for k, v in flat_params.items()}))))
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in grads.values())))
    return {k: g * min(1.0, config.grad_clip_norm / norm) for k, g in grads.items()}

  start = checkpoint.flatten(checkpoint.load_npz(npz_path))
  start["head/kernel"] = np.zeros((TINY["hidden_dim"], 3), np.float32)
  start["head/bias"] = np.zeros(3, np.float32)
  lr = [config.learning_rate, config.learning_rate * 0.5]  # Cosine over 2 steps, no warmup.
  g1 = clipped_grads(start)
  expected1 = {k: start[k] - lr[0] * g1[k] for k in start}
  g2 = clipped_grads(expected1)
  expected2 = {k: expected1[k] - lr[1] * (g2[k] + config.momentum * g1[k]) for k in start}

  step1, info = checkpoint.load_params(os.path.join(workdir, "checkpoints", "1"))
  step2, _ = checkpoint.load_params(os.path.join(workdir, "checkpoints", "2"))
  step1, step2 = checkpoint.flatten(step1), checkpoint.flatten(step2)
  assert set(step1) == set(start) and info["num_classes"] == 3
  for k in start:
    np.testing.assert_allclose(step1[k], expected1[k], atol=2e-6, err_msg=k)
    np.testing.assert_allclose(step2[k], expected2[k], atol=2e-6, err_msg=k)
  # With a zero head kernel no gradient reaches the body, so the first step moves only
  # the head; the second moves everything.
  assert np.any(step1["head/kernel"])
  for k in start:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(step1[k], start[k])
  moved = [k for k in start if np.any(step2[k] != start[k])]
  assert "stem/kernel" in moved and "MixerBlock_0/token_mixing/Dense_0/kernel" in moved
  with open(os.path.join(workdir, "model.json")) as f:
    assert json.load(f)["model"] == TINY

  # evaluate on the workdir (latest step = 2) reproduces the trainer's final evaluation.
  result = evaluate.evaluate(config, workdir)
  assert result["split"] == "validation" and result["num_examples"] == 24
  assert result["top1"] == pytest.approx(final["accuracy"], abs=1e-9)
  assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_finetune_higher_resolution(tmp_path):
  """At twice the checkpoint's side: K^2 = 4 block-diagonal token-mixing copies."""
  from mixer_jax import resolution
  root = write_folder(str(tmp_path / "data"), 3, 4)
  npz_path = write_checkpoint(str(tmp_path / "Mixer-tiny_10.npz"), 10)
  config = _finetune_config(root, npz_path, image_size=2 * SIZE, num_train_steps=1)
  workdir = str(tmp_path / "work")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "model.json")) as f:
    record = json.load(f)
  assert record["image_size"] == 16
  assert record["model"] == dict(TINY, tokens_mlp_dim=4 * TINY["tokens_mlp_dim"])
  # The zero head passes no gradient to the body in step 1: the body is still the init.
  step1 = checkpoint.flatten(checkpoint.load_params(workdir)[0])
  pre = checkpoint.flatten(checkpoint.load_npz(npz_path))
  prefix = "MixerBlock_0/token_mixing/"
  expanded = resolution.expand_token_mixing(
      *(pre[prefix + n] for n in ("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel",
                                  "Dense_1/bias")), 2)
  for n, v in zip(("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"),
                  expanded):
    np.testing.assert_array_equal(step1[prefix + n], v)
  for k in pre:
    if not k.startswith(("head/", prefix)):
      np.testing.assert_array_equal(step1[k], pre[k])
  # The workdir evaluates at its own 16 px and names that size when asked for 8.
  assert evaluate.evaluate(config, workdir)["image_size"] == 16
  with pytest.raises(evaluate.EvaluateError, match="image size 16"):
    evaluate.evaluate(config, workdir, image_size=8)
