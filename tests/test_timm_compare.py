"""benchmarks/timm_compare.py: flags, and a tiny side-by-side run where torch and timm are
installed (they are not project requirements, so CI skips that one)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import timm_compare  # noqa: E402


def test_defaults_are_the_issue_setting():
  args = timm_compare.parse([])
  assert (args.variant, args.batch_size, args.mode) == ("S/32", 32, "train")
  assert not args.timm_keep_host_memory


def test_resmlp_and_gmlp_compare_with_timms_namesakes():
  from mixer_jax.tools import benchmark
  for variant, timm_name in (("resmlp_12", "resmlp_12_224"), ("gmlp_s16", "gmlp_s16_224")):
    for mode in ("train", "eval"):
      args = timm_compare.parse([f"--variant={variant}", f"--mode={mode}"])
      assert (args.variant, timm_compare.TIMM_NAMES[args.variant]) == (variant, timm_name)
    # Both families compute the exact GELU on both sides; the Mixer ours the tanh form.
    assert timm_compare.gelu_forms(variant) == {"ours": "erf", "timm": "erf"}
  assert timm_compare.gelu_forms("S/32") == {"ours": "tanh", "timm": "erf"}
  for variant in timm_compare.TIMM_NAMES:  # The ours side's flags accept every one.
    assert benchmark.parse_args([f"--variant={variant}", "--mode=eval"]).variant == variant


def test_module_import_leaves_malloc_to_each_worker():
  # The timm worker imports this module too: importing it must not change the process's
  # malloc settings (each worker decides, before its runtime starts threads).
  code = "import timm_compare; from mixer_jax import host_memory; print(host_memory.applied())"
  proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(REPO, "benchmarks"),
                        env=dict(os.environ, MIXER_JAX_KEEP_HOST_MEMORY="1"),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["False"]


def test_side_by_side_run_prints_the_ratio_json():
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "benchmarks/timm_compare.py", "--mode=eval", "--batch_size=2",
       "--rounds=2", "--steps=1", "--warmup=1", "--peak_size=64"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["timed_steps_each"] == 2 and r["num_params"] == 19_104_624
  assert r["ratio"] == pytest.approx(r["ours_images_per_s"] / r["timm_images_per_s"])
  assert r["ours_keep_host_memory"] is True and r["timm_keep_host_memory"] is False
  assert r["ours_utilisation_vs_matmul"] > 0
