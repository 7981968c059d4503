"""mixer_jax.benchmark: flag validation and the JSON it prints, on a tiny model.

Speed is not tested here (BENCHMARKS.md holds the measurements); these check that
each mode runs, reports consistent figures and that train/eval need no TensorFlow.
"""

import json
import os
import subprocess
import sys

import pytest

from mixer_jax import benchmark
from mixer_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--variant=S/8", "--image_size=32", "--num_blocks=1", "--hidden_dim=16",
        "--tokens_mlp_dim=8", "--channels_mlp_dim=16", "--num_classes=10",
        "--batch_size=4", "--steps=2", "--warmup=1", "--peak_size=64"]
TINY_INPUT = ["--image_size=32", "--batch_size=4", "--steps=2", "--warmup=1",
              "--source_size=64x48", "--num_source_images=4", "--num_classes=10"]


def _last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def test_defaults_are_the_issue_setting():
  args = benchmark.parse_args([])
  assert (args.mode, args.variant, args.batch_size, args.image_size, args.dtype) == (
      "train", "S/32", 32, 224, "float32")
  assert args.source_wh == (500, 375)


def test_input_with_train_step_is_end_to_end():
  assert benchmark.parse_args(["--mode=input", "--with_train_step"]).mode == "end_to_end"


@pytest.mark.parametrize("argv,fragment", [
    (["--mode=fast"], "--mode='fast' is not one of train, eval, input, end_to_end"),
    (["--dtype=float16"], "--dtype='float16' is not one of float32, bfloat16"),
    (["--batch_size=0"], "--batch_size=0 must be a positive integer"),
    (["--steps=-1"], "--steps=-1 must be a positive integer"),
    (["--rounds=0"], "--rounds=0 must be a positive integer"),
    (["--warmup=-1"], "--warmup=-1 must be zero or positive"),
    (["--peak_size=-2"], "--peak_size=-2 must be zero or positive"),
    (["--image_size=100"], "not divisible by the patch size 32"),
    (["--source_size=500"], "--source_size='500' must be WIDTHxHEIGHT"),
    (["--stoch_depth=1"], "--stoch_depth=1.0 must be in [0, 1)"),
    (["--mode=end_to_end", "--warmup=0"], "--warmup must be at least 1"),
    (["--batch_size=abc"], "invalid int value"),
    (["--no_such_flag=1"], "Unrecognized arguments: --no_such_flag=1"),
])
def test_bad_flags_raise_one_sentence(argv, fragment):
  with pytest.raises(benchmark.BenchmarkError) as e:
    benchmark.parse_args(argv)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_variant_is_a_user_error():
  with pytest.raises(ValueError, match="Unknown Mixer variant"):
    benchmark.parse_args(["--variant=Q/7"])


def test_main_prints_one_line_error_and_exit_2(capsys):
  assert benchmark.main(["--mode=nope"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Error: --mode='nope'") and err.count("\n") == 1


def test_datasheet_peaks():
  assert benchmark.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark.datasheet_peak("NVIDIA H100 PCIe", "float32") == 378e12
  assert benchmark.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
  assert benchmark.datasheet_peak("cpu", "float32") is None


def test_train_mode_json_without_tensorflow():
  # A fresh interpreter: the train mode must not import TF, tfds, ml_collections or clu.
  code = ("import sys; from mixer_jax import benchmark; rc = benchmark.main(sys.argv[1:]); "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu') "
          "if m in sys.modules]; assert not bad, bad; sys.exit(rc)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code, "--mode=train"] + TINY, cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = _last_json(proc.stdout)
  assert r["mode"] == "train" and r["timed_steps"] == 2 and r["batch_size"] == 4
  assert r["images_per_s"] == pytest.approx(4 / r["step_time_s"])
  # A train step costs more than a forward pass, and both come from XLA.
  assert r["train_flops_per_image"] > 2 * r["forward_flops_per_image"] > 0
  assert r["achieved_flops"] == pytest.approx(r["train_flops_per_image"] * r["images_per_s"])
  assert r["utilisation_vs_matmul"] == pytest.approx(r["achieved_flops"] / r["peak_matmul_flops"])
  assert r["device"]["platform"] == "cpu" and r["device"]["cores"] >= 1
  assert r["page_faults_per_step"] >= 0 and isinstance(r["device"]["keep_host_memory"], bool)
  assert r["mfu"] is None and r["datasheet_peak_flops"] is None  # No datasheet for CPUs.
  assert r["model_overrides"] == {"num_blocks": 1, "hidden_dim": 16, "tokens_mlp_dim": 8,
                                  "channels_mlp_dim": 16}
  assert "images/s" in proc.stdout


def test_flops_fall_back_to_the_jaxprs_matmuls_where_xla_cannot_count():
  # GPU plugins cannot cost a lowered program; the jaxpr's matmul count stands in. XLA's
  # count (on CPU) also has the element-wise work, a large share in this tiny model.
  args = benchmark.parse_args(["--mode=train"] + TINY)
  bench = benchmark.TrainBench(args)
  xla = benchmark.program_flops(bench.step, bench.state, bench.batch)

  class NoCostAnalysis:
    def cost_analysis(self):
      raise NotImplementedError("Lowered.cost_analysis not implemented on platform 'gpu'.")

  fallback = benchmark.program_flops(bench.step, bench.state, bench.batch,
                                     lowered=NoCostAnalysis())
  assert 0.75 * xla < fallback < xla


def test_eval_mode_json(capsys):
  assert benchmark.main(["--mode=eval", "--dtype=bfloat16"] + TINY) == 0
  r = _last_json(capsys.readouterr().out)
  assert r["mode"] == "eval" and r["dtype"] == "bfloat16" and r["timed_steps"] == 2
  assert r["flops_per_image"] == r["forward_flops_per_image"] > 0
  assert r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
  assert 0 < r["utilisation_vs_matmul"]


def test_input_mode_json(capsys):
  assert benchmark.main(["--mode=input"] + TINY_INPUT) == 0
  r = _last_json(capsys.readouterr().out)
  assert r["mode"] == "input" and r["timed_steps"] == 2
  assert r["augmentation"] == {"train_crop": "inception", "train_flip": True,
                               "randaugment_layers": 2, "randaugment_magnitude": 15,
                               "source_size": "64x48"}
  assert r["images_per_s_per_core"] == pytest.approx(r["images_per_s_window"] /
                                                     r["device"]["cores"])
  assert r["mean_jpeg_bytes"] > 0 and "achieved_flops" not in r


def test_end_to_end_mode_json(capsys):
  argv = ["--mode=input", "--with_train_step"] + TINY + [
      "--source_size=64x48", "--num_source_images=4"]
  assert benchmark.main(argv) == 0
  r = _last_json(capsys.readouterr().out)
  assert r["mode"] == "end_to_end"
  assert r["end_to_end_ratio"] == pytest.approx(r["end_to_end_images_per_s"] /
                                                r["train_images_per_s"])
  assert r["train_flops_per_image"] > 0
  assert len(r["end_to_end_round_ratios"]) == 2  # --rounds' default: bare/fed pairs.


def test_input_pipeline_source_makes_decodable_jpegs():
  import tensorflow as tf
  source = benchmark.InMemoryJpegs(2, 40, 30, num_classes=3)
  example = next(iter(source.read("train", 0, 1)))
  image = tf.io.decode_jpeg(example["image"])
  assert tuple(image.shape) == (30, 40, 3) and 0 <= int(example["label"]) < 3
  # Not a flat image: a decoder has real work to do.
  assert float(tf.math.reduce_std(tf.cast(image, tf.float32))) > 5


# ------------------------------------------- the speed rewrites keep the numerics
def test_gelu_rewrite_matches_tanh_gelu_and_its_gradient():
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 4001),
                       jax.random.normal(jax.random.key(0), (10_000,)) * 3])
  ref = nn.gelu(x, approximate=True)
  assert bool(jnp.all(jnp.isfinite(models.gelu(x))))
  assert float(jnp.max(jnp.abs(models.gelu(x) - ref))) < 1e-5
  grad = jax.vmap(jax.grad(models.gelu))(x)
  grad_ref = jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=True)))(x)
  assert float(jnp.max(jnp.abs(grad - grad_ref))) < 1e-5


def test_patch_stem_matches_the_conv_it_replaces():
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  images = jax.random.uniform(jax.random.key(1), (2, 32, 48, 3), minval=-1, maxval=1)
  kwargs = dict(features=8, kernel_size=(16, 16), strides=(16, 16), padding="VALID")
  stem, conv = models.PatchStem(**kwargs), nn.Conv(**kwargs)
  params = conv.init(jax.random.key(2), images)
  # Same parameter tree and the same initial values from the same key.
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
      stem.init(jax.random.key(2), images), params))
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # Non-zero bias too.
  out, ref = stem.apply(params, images), conv.apply(params, images)
  assert out.shape == ref.shape == (2, 2, 3, 8)
  assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
  bf16 = models.PatchStem(**kwargs, dtype=jnp.bfloat16).apply(params, images)
  assert bf16.dtype == jnp.bfloat16


def test_patch_stem_refuses_overlapping_patches():
  import jax
  import jax.numpy as jnp
  stem = models.PatchStem(features=4, kernel_size=(4, 4), strides=(2, 2), padding="VALID")
  with pytest.raises(ValueError, match="non-overlapping"):
    stem.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
