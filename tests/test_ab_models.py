"""benchmarks/ab_models.py: a tiny before/after run against HEAD's models.py, and its errors."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import ab_models  # noqa: E402

TINY = ["--variant=S/8", "--image_size=32", "--num_blocks=1", "--hidden_dim=16",
        "--tokens_mlp_dim=8", "--channels_mlp_dim=16", "--num_classes=10",
        "--batch_size=4", "--warmup=1", "--rounds=2", "--steps_per_round=1"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_before_and_after_run_in_one_process(mode, capsys):
  assert ab_models.main(["--before=HEAD", f"--mode={mode}"] + TINY) == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r["mode"] == mode and r["before"] == "HEAD" and r["rounds"] == 2
  assert r["before_step_time_s"] > 0 and r["after_step_time_s"] > 0
  assert r["speedup"] == pytest.approx(r["before_step_time_s"] / r["after_step_time_s"])
  assert r["model_overrides"]["hidden_dim"] == 16 and len(r["after_commit"]) == 40


def test_the_before_model_comes_from_the_revision():
  before = ab_models.load_models_at("HEAD")
  assert before.__name__ != ab_models.models.__name__
  assert before.create_model is not ab_models.models.create_model


def test_the_before_model_can_be_a_file(tmp_path):
  # For checkouts whose git history lacks the revision (a copied working tree).
  path = tmp_path / "before_models.py"
  path.write_text("MARK = 7\ndef create_model(*a, **k):\n  return MARK\n")
  before = ab_models.load_models_at(str(path))
  assert before.MARK == 7 and before.create_model() == 7


@pytest.mark.parametrize("argv,fragment", [
    (["--before=no-such-revision"], "cannot read mixer_jax/models.py at 'no-such-revision'"),
    (["--before=HEAD", "--mode=input"], "--mode must be train or eval"),
    (["--before=HEAD", "--rounds=0"], "--rounds and --steps_per_round must be at least 1"),
    (["--before=HEAD", "--variant=Q/3"], "Q/3"),
])
def test_user_errors_are_one_sentence(argv, fragment, capsys):
  with pytest.raises(SystemExit) as exit_info:
    ab_models.main(TINY + argv)  # The last of a repeated flag wins.
  message = str(exit_info.value.code) if isinstance(exit_info.value.code, str) else \
      capsys.readouterr().err
  assert fragment in message
  assert exit_info.value.code != 0
