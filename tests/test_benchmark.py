"""mixer_jax.tools.benchmark: flag validation and the JSON it prints, on a tiny model.

Speed is not tested here (BENCHMARKS.md holds the measurements); these check that
each mode runs, reports consistent figures and that train/eval need no TensorFlow.
"""

import json
import os
import subprocess
import sys

import pytest

from mixer_jax.tools import benchmark
from mixer_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--variant=S/8", "--image_size=32", "--num_blocks=1", "--hidden_dim=16",
        "--tokens_mlp_dim=8", "--channels_mlp_dim=16", "--num_classes=10",
        "--batch_size=4", "--steps=2", "--warmup=1", "--peak_size=64"]
TINY_INPUT = ["--image_size=32", "--batch_size=4", "--steps=2", "--warmup=1",
              "--num_source_images=4", "--num_classes=10"]


def _last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def test_defaults_are_the_issue_setting():
  args = benchmark.parse_args([])
  assert (args.mode, args.variant, args.batch_size, args.image_size, args.dtype) == (
      "train", "S/32", 32, 224, "float32")


@pytest.mark.parametrize("argv,fragment", [
    (["--mode=fast"], "--mode: invalid choice: 'fast'"),
    (["--dtype=float16"], "--dtype: invalid choice: 'float16'"),
    (["--batch_size=0"], "--batch_size: '0' is not int >= 1"),
    (["--steps=-1"], "--steps: '-1' is not int >= 1"),
    (["--rounds=0"], "--rounds: '0' is not int >= 1"),
    (["--warmup=-1"], "--warmup: '-1' is not int >= 0"),
    (["--peak_size=-2"], "--peak_size: '-2' is not int >= 0"),
    (["--batch_size=abc"], "--batch_size: 'abc' is not int >= 1"),
    (["--mixup_alpha=-1"], "--mixup_alpha: '-1' is not float >= 0"),
    (["--stoch_depth=1"], "--stoch_depth=1.0 must be in [0, 1)"),
    (["--image_size=100"], "not divisible by the patch size 32"),
    (["--mode=end_to_end", "--warmup=0"], "--warmup must be at least 1"),
    (["--no_such_flag=1"], "Unrecognized arguments: --no_such_flag=1"),
])
def test_bad_flags_raise_one_sentence(argv, fragment):
  with pytest.raises(errors.ConfigError) as e:
    benchmark.parse_args(argv)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_variant_is_a_user_error():
  with pytest.raises(ValueError, match="Unknown Mixer variant"):
    benchmark.parse_args(["--variant=Q/7"])


def test_main_prints_one_line_error_and_exit_2(capsys):
  assert benchmark.main(["--mode=nope"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Error: Argument --mode: invalid choice") and err.count("\n") == 1


def test_datasheet_peaks():
  assert benchmark.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark.datasheet_peak("NVIDIA H100 PCIe", "float32") == 378e12
  assert benchmark.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
  assert benchmark.datasheet_peak("cpu", "float32") is None


def test_train_mode_json_without_tensorflow():
  # A fresh interpreter: the train mode must not import TF, tfds, ml_collections or clu.
  code = ("import sys; from mixer_jax.tools import benchmark; rc = benchmark.main(sys.argv[1:]); "
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
  assert isinstance(r["device"]["keep_host_memory"], bool) and r["max_rss_mb"] > 0
  assert r["mfu"] is None and r["datasheet_peak_flops"] is None  # No datasheet for CPUs.
  assert r["model_overrides"] == {"num_blocks": 1, "hidden_dim": 16, "tokens_mlp_dim": 8,
                                  "channels_mlp_dim": 16}
  assert proc.stdout.splitlines()[-2].startswith("train S/8 batch 4 float32 on cpu: ")


def test_flops_where_the_backend_cannot_cost_an_unoptimised_program():
  # GPU plugins cannot; the program is then lowered for the host CPU and costed there.
  bench = benchmark.ForwardBench(benchmark.parse_args(["--mode=eval"] + TINY))
  xla = benchmark.program_flops(bench.forward, bench.params, bench.images)

  class NoCostAnalysis:
    def cost_analysis(self):
      raise NotImplementedError("Lowered.cost_analysis not implemented on platform 'gpu'.")

  relowered = benchmark.program_flops(bench.forward, bench.params, bench.images,
                                      lowered=NoCostAnalysis())
  assert relowered == xla > 0
  # On a CPU the compiled program's count is close: the same model, fused.
  compiled = bench.compiled.cost_analysis()
  compiled = compiled[0] if isinstance(compiled, (list, tuple)) else compiled
  assert compiled["flops"] == pytest.approx(xla, rel=0.1)


def test_eval_mode_json(capsys):
  assert benchmark.main(["--mode=eval", "--dtype=bfloat16"] + TINY) == 0
  r = _last_json(capsys.readouterr().out)
  assert r["mode"] == "eval" and r["dtype"] == "bfloat16" and r["timed_steps"] == 2
  assert r["flops_per_image"] == r["forward_flops_per_image"] > 0
  assert 0 < r["utilisation_vs_matmul"] and "train_flops_per_image" not in r


def test_input_mode_json(capsys):
  assert benchmark.main(["--mode=input"] + TINY_INPUT) == 0
  r = _last_json(capsys.readouterr().out)
  assert r["mode"] == "input" and r["timed_steps"] == 2
  assert r["augmentation"] == {"train_crop": "inception", "train_flip": True,
                               "randaugment_layers": 2, "randaugment_magnitude": 15}
  assert r["images_per_s_per_core"] == pytest.approx(r["images_per_s"] / r["device"]["cores"])
  assert r["mean_jpeg_bytes"] > 0 and "achieved_flops" not in r
  assert "platform" not in r["device"]  # The input mode does not start JAX.


def test_end_to_end_mode_json(capsys):
  assert benchmark.main(["--mode=end_to_end"] + TINY + ["--num_source_images=4"]) == 0
  r = _last_json(capsys.readouterr().out)
  assert r["mode"] == "end_to_end" and r["images_per_s"] == r["end_to_end_images_per_s"]
  assert r["end_to_end_ratio"] == pytest.approx(r["end_to_end_images_per_s"] /
                                                r["train_images_per_s"])
  assert r["train_flops_per_image"] > 0


def test_input_pipeline_source_makes_decodable_jpegs():
  import tensorflow as tf
  source = benchmark.InMemoryJpegs(2, num_classes=3, width=40, height=30)
  examples = source.examples("train", in_memory=True)
  assert len(examples) == 2
  example = examples.lookup(tf.constant(1, tf.int64))
  image = tf.io.decode_jpeg(example["image"])
  assert tuple(image.shape) == (30, 40, 3) and 0 <= int(example["label"]) < 3
  # Not a flat image: a decoder has real work to do.
  assert float(tf.math.reduce_std(tf.cast(image, tf.float32))) > 5
