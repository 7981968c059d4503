"""memory.py: per-device bytes of the train step for each sharding strategy."""

import json
import subprocess
import sys

from conftest import REPO
from test_distributed import TINY, _env


# ----------------------------------------------------------------- memory tool
def test_memory_tool_fsdp_divides_parameter_and_optimizer_bytes():
  wrapper = ("import runpy, sys\n"
             "sys.argv = ['mixer_jax.tools.memory'] + sys.argv[1:]\n"
             "try:\n"
             "  runpy.run_module('mixer_jax.tools.memory', run_name='__main__')\n"
             "finally:\n"
             "  print('TENSORFLOW_IMPORTED', 'tensorflow' in sys.modules)\n")
  args = ["--config=configs/default.py", "--num_devices=8", "--num_classes=10",
          "--config.fsdp_min_size=0", "--remat_policies=full"] + [
              f"--config.model.{k}={v}" for k, v in TINY.items()]
  result = subprocess.run([sys.executable, "-c", wrapper] + args, cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == "TENSORFLOW_IMPORTED False"
  report = json.loads(lines[-2])
  assert report["header"]["num_devices"] == 8 and report["header"]["per_device_batch"] == 16
  # One row per strategy x --remat_policies entry.
  assert [(r["strategy"], r["remat_policy"]) for r in report["rows"]] == [
      ("replicate", "full"), ("fsdp", "full")]
  rows = {r["strategy"]: r for r in report["rows"]}
  replicate, fsdp = rows["replicate"], rows["fsdp"]
  # Only the step counter and arrays with no dimension divisible by 8 (the 10-class
  # head bias) stay whole: ~8-fold.
  ratio = replicate["params_plus_opt"] / fsdp["params_plus_opt"]
  assert 7 < ratio <= 8, ratio
  # Adam's mu and nu, plus two step counters.
  assert replicate["opt_state"] == 2 * replicate["params"] + 8
  for row in (replicate, fsdp):
    assert row["arguments"] == row["arguments_computed"]  # XLA agrees with the shardings.
    # uint8 images, int32 labels.
    assert row["temporaries"] > 0 and row["batch"] == 16 * (8 * 8 * 3 + 4)
  assert "params_plus_opt" in lines[1] and lines[2].startswith("replicate")


def test_memory_simulation_env_replaces_device_count():
  from mixer_jax.tools import memory
  env = memory.simulation_env(256, {"XLA_FLAGS": "--xla_foo=1 "
                                    "--xla_force_host_platform_device_count=2"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=256"
  assert env["JAX_PLATFORMS"] == "cpu"




def test_memory_tool_checks_the_config_like_training():
  # The tool reads a training config: the one config check refuses it, in process (the
  # tool's JAX is already set up here with however many devices this test has).
  import jax
  import pytest
  from configs import common
  from mixer_jax import errors
  from mixer_jax.tools import memory
  config = common.base_config()
  config.model.variant = "S/32"
  config.optimizer = "lars"
  with pytest.raises(errors.ConfigError, match="config.optimizer='lars' is not one of"):
    memory.run(config, jax.device_count(), 10, ["replicate"])
