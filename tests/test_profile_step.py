"""benchmarks/profile_step.py on a tiny model (CPU)."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # A script folder, not a package.
import profile_step  # noqa: E402

TINY = ["--variant=S/8", "--image_size=32", "--num_blocks=1", "--hidden_dim=16",
        "--tokens_mlp_dim=8", "--channels_mlp_dim=16", "--num_classes=10",
        "--batch_size=4", "--warmup=1"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_profile_writes_per_op_times_and_the_compiled_program(mode, tmp_path, capsys):
  out = tmp_path / "prof"
  assert profile_step.main([f"--out={out}", f"--mode={mode}", "--profile_steps=2"] + TINY) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["mode"] == mode and summary["lines"]
  profile = json.loads((out / "profile.json").read_text())
  assert profile["profile_steps"] == 2 and profile["temp_bytes"] > 0
  ops = [op for line in profile["lines"].values() for op in line["ops"]]
  # Some XLA op ran, each with a positive call count and time; the matmuls are found.
  assert ops and all(calls > 0 and ms >= 0 for _, calls, ms, _ in ops)
  assert any(line["matmul_ms_per_step"] > 0 for line in profile["lines"].values())
  assert "HloModule" in (out / "hlo.txt").read_text()
  # Grouped by model code: the blocks' ops fold into MixerBlock_* rows, and the rows
  # account for every op's time.
  rows = profile["by_source"]
  assert any("MixerBlock_*/" in row["source"] and "[" in row["shape"] for row in rows)
  assert not any("MixerBlock_0" in row["source"] for row in rows)
  total = sum(line["ms_per_step"] for line in profile["lines"].values())
  assert sum(row["ms_per_step"] for row in rows) == pytest.approx(total, rel=1e-6)
  assert list(out.glob("trace/**/*.xplane.pb"))


def test_profile_refuses_the_input_modes(tmp_path, capsys):
  assert profile_step.main([f"--out={tmp_path}", "--mode=input"] + TINY) == 2
  assert "--mode=train or --mode=eval" in capsys.readouterr().err


def test_op_sources_reads_names_shapes_and_folds_blocks():
  hlo = "\n".join([
      '  %fusion.3 = f32[4,8]{1,0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name='
      '"jit(step_fn)/jvp(MlpMixer)/MixerBlock_11/token_mixing/Dense_0/mul" stack_frame_id=3}',
      '  ROOT %tuple.1 = (f32[2]{0}, s32[]) fusion(%a), metadata={op_name="jit(f)/add"}',
      '  %copy.2 = f32[3]{0} copy(%x)',  # No metadata: not a source.
  ])
  assert profile_step.op_sources(hlo) == {
      "fusion.3": ("f32[4,8]{1,0}", "jvp(MlpMixer)/MixerBlock_*/token_mixing/Dense_0/mul"),
      "tuple.1": ("(f32[2]{0}, s32[])", "add")}
