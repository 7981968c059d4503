"""Tests of the launch/ scripts.

The TPU and SLURM launchers are checked with --dry-run (which prints every
command, one per line, and runs nothing). launch/local.sh is also run for real
with PYTHON pointing to a stub that records its arguments instead of training.
"""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm.sh", "local.sh"]

# Passthrough flags for mixer_jax.main, including values that need quoting.
MAIN_ARGS = [
    "--config=configs/imagenet1k_pretrain.py:B/16",
    "--config.note=hello world",
    "--config.tag=it's $HOME `x`",
]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("PYTHON", "XLA_FLAGS", "PROCS_PER")}
    env.update(extra)
    return env


def run(script, *args, env=None, timeout=30):
    return subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env if env is not None else clean_env(), timeout=timeout, check=False)


def dry_run(script, *args, env=None):
    # Before the args: everything after "--" belongs to mixer_jax.main.
    res = run(script, "--dry-run", *args, env=env)
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in res.stdout.splitlines()]


def has_subsequence(tokens, seq):
    n = len(seq)
    return any(tokens[i:i + n] == list(seq) for i in range(len(tokens) - n + 1))


def jax_version():
    text = (REPO / "requirements.txt").read_text()
    return re.search(r"^jax==(\S+)", text, re.M).group(1)


def ssh_commands(lines):
    """The remote --command strings of the 'tpu-vm ssh' lines, checking --worker=all."""
    out = []
    for tokens in lines:
        if tokens[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            assert "--worker=all" in tokens, tokens
            cmd = [t for t in tokens if t.startswith("--command=")]
            assert len(cmd) == 1, tokens
            out.append(cmd[0][len("--command="):])
    return out


# ------------------------------------------------------------------ common CLI


def test_scripts_are_executable_and_parse():
    for name in SCRIPTS + ["slurm.sbatch"]:
        path = LAUNCH / name
        assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(script):
    res = run(script, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: ")
    assert "--dry-run" in res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_is_a_one_line_error(script):
    res = run(script, "--bogus-option", "--dry-run")
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "--bogus-option" in lines[0]


@pytest.mark.parametrize("script,args", [
    ("tpu_pod.sh", ["run", "--name", "t", "--zone"]),
    ("slurm.sh", ["--nodes"]),
    ("local.sh", ["--num_processes"]),
])
def test_missing_option_value_is_a_one_line_error(script, args):
    res = run(script, *args)
    assert res.returncode != 0
    assert len(res.stderr.splitlines()) == 1, res.stderr


# ------------------------------------------------------------------ tpu_pod.sh

TPU = ["--name", "mixer-b16", "--zone", "us-central2-b", "--accelerator-type", "v4-32"]


def test_tpu_all_spot_dry_run():
    lines = dry_run("tpu_pod.sh", "all", *TPU, "--spot", "--workdir", "gs://bucket/mixer b16",
                    "--", *MAIN_ARGS)
    gcloud = [t for t in lines if t[0] == "gcloud"]
    assert all("--zone=us-central2-b" in t for t in gcloud)

    # create: a spot queued resource, not a plain tpu-vm create.
    assert lines[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "mixer-b16-qr",
                        "--node-id=mixer-b16", "--zone=us-central2-b", "--accelerator-type=v4-32",
                        "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert not any(has_subsequence(t, ["tpu-vm", "create"]) for t in lines)
    # run waits for the queued resource before using the VM.
    assert has_subsequence(lines[1], ["queued-resources", "describe", "mixer-b16-qr"])

    # the repo is copied to every worker.
    scp = [t for t in lines if has_subsequence(t, ["tpu-vm", "scp"])]
    assert len(scp) == 1
    assert "--recurse" in scp[0] and "--worker=all" in scp[0] and "mixer-b16:" in scp[0]
    assert scp[0][scp[0].index("--recurse") + 1].endswith("/mixer_jax")

    remote = ssh_commands(lines)
    for command in remote:  # the workers run them with bash
        res = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, (command, res.stderr)
    install = [c for c in remote if "pip install" in c]
    assert len(install) == 1
    assert "-r requirements.txt" in install[0]
    assert f"jax[tpu]=={jax_version()}" in shlex.split(install[0])

    # exactly one command starts training, the same one on all workers.
    launch = [c for c in remote if "mixer_jax.main" in c]
    assert len(launch) == 1
    tokens = shlex.split(launch[0])
    assert has_subsequence(tokens, ["nohup", "~/mixer_venv/bin/python", "-m", "mixer_jax.main",
                                    "--workdir=gs://bucket/mixer b16", *MAIN_ARGS, ">"])
    assert "~/mixer_logs/worker_$W.log" in tokens
    assert "&" in tokens  # detached, so a dropped ssh doesn't stop training
    assert "--coordinator_address" not in launch[0]
    # order: create, wait, copy, install, start.
    def index(pred):
        return next(i for i, t in enumerate(lines) if pred(t))
    order = [0, 1, index(lambda t: t == scp[0]),
             index(lambda t: f"--command={install[0]}" in t),
             index(lambda t: f"--command={launch[0]}" in t)]
    assert order == sorted(order)


def test_tpu_remote_launch_command_runs_detached_with_intact_args(tmp_path):
    """Execute the remote start command locally (fake HOME, venv and curl)."""
    lines = dry_run("tpu_pod.sh", "run", *TPU, "--workdir", "/data/w d", "--skip-install",
                    "--env", "TFDS_DATA_DIR=gs://b/tf ds", "--", *MAIN_ARGS)
    remote = ssh_commands(lines)
    assert not any("pip install" in c for c in remote)
    launch = [c for c in remote if "mixer_jax.main" in c][0]

    home = tmp_path / "home"
    (home / "mixer_jax").mkdir(parents=True)
    venv_bin = home / "mixer_venv" / "bin"
    venv_bin.mkdir(parents=True)
    stub = venv_bin / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps([sys.argv[1:], os.getcwd(), os.environ.get('TFDS_DATA_DIR')]))\n")
    stub.chmod(0o755)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "curl").write_text("#!/bin/sh\necho 2\n")  # TPU metadata: worker number 2
    (fake_bin / "curl").chmod(0o755)

    env = clean_env(HOME=str(home), PATH=f"{fake_bin}:{os.environ['PATH']}")
    res = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, env=env,
                         timeout=10, check=False)
    assert res.returncode == 0, res.stderr
    assert "worker 2: started pid" in res.stdout

    log = home / "mixer_logs" / "worker_2.log"
    deadline = time.time() + 5
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.05)
    argv, cwd, tfds = json.loads(log.read_text())
    assert argv == ["-m", "mixer_jax.main", "--workdir=/data/w d", *MAIN_ARGS]
    assert cwd == str(home / "mixer_jax")
    assert tfds == "gs://b/tf ds"


def test_tpu_create_and_delete_without_spot():
    lines = dry_run("tpu_pod.sh", "create", *TPU, "--version", "tpu-vm-v4-base")
    assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "create", "mixer-b16",
                      "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-vm-v4-base"]]
    lines = dry_run("tpu_pod.sh", "delete", "--name", "mixer-b16", "--zone", "us-central2-b",
                    "--project", "p")
    assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "mixer-b16",
                      "--zone=us-central2-b", "--project=p", "--quiet"]]


def test_tpu_stop_runs_on_all_workers():
    lines = dry_run("tpu_pod.sh", "stop", "--name", "mixer-b16", "--zone", "z")
    (command,) = ssh_commands(lines)
    assert "pkill" in command and "mixer_jax[.]main" in command


def test_tpu_delete_spot_deletes_the_queued_resource():
    lines = dry_run("tpu_pod.sh", "delete", "--spot", "--name", "mixer-b16", "--zone", "z")
    assert lines == [["gcloud", "compute", "tpus", "queued-resources", "delete", "mixer-b16-qr",
                      "--zone=z", "--force", "--quiet"]]


def test_tpu_logs_fetches_from_every_worker():
    lines = dry_run("tpu_pod.sh", "logs", "--name", "mixer-b16", "--zone", "z",
                    "--num-workers", "4", "--log-dir", "/tmp/l")
    assert lines[0] == ["mkdir", "-p", "/tmp/l"]
    scp = lines[1:]
    assert len(scp) == 4
    for i, tokens in enumerate(scp):
        assert tokens[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
        assert "mixer-b16:mixer_logs/*" in tokens and "/tmp/l/" in tokens
        assert f"--worker={i}" in tokens


def test_tpu_run_requires_workdir():
    res = run("tpu_pod.sh", "run", "--name", "t", "--zone", "z", "--dry-run")
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "--workdir" in res.stderr


def test_tpu_unknown_subcommand():
    res = run("tpu_pod.sh", "launch", "--name", "t", "--zone", "z")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1


# ------------------------------------------------------------------ slurm


def test_slurm_sbatch_defaults():
    directives = dict(
        line[len("#SBATCH --"):].split("=", 1)
        for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH --"))
    assert directives["nodes"] == "2"
    assert directives["ntasks-per-node"] == "8"
    assert directives["gpus-per-node"] == "8"
    assert "time" in directives and "output" in directives


def test_slurm_dry_run_one_process_per_gpu():
    lines = dry_run("slurm.sh", "--time", "48:00:00", "--", *MAIN_ARGS)
    assert len(lines) == 2
    sbatch, srun = lines
    assert sbatch[0] == "sbatch"
    for piece in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=48:00:00",
                  f"--chdir={REPO}"]:
        assert piece in sbatch
    script = sbatch.index(str(LAUNCH / "slurm.sbatch"))
    assert sbatch[script + 1:] == MAIN_ARGS
    assert any(t.startswith("--export=ALL,PROCS_PER=gpu") for t in sbatch)

    assert srun[0] == "srun"
    assert "--ntasks=16" in srun and "--ntasks-per-node=8" in srun
    assert "--kill-on-bad-exit=1" in srun
    assert has_subsequence(srun, ["python", "-m", "mixer_jax.main", *MAIN_ARGS])
    assert srun[-len(MAIN_ARGS):] == MAIN_ARGS
    assert not any("coordinator" in t or "process_id" in t for t in srun)


def test_slurm_dry_run_one_process_per_node():
    lines = dry_run("slurm.sh", "--nodes", "4", "--gpus-per-node", "4", "--procs-per", "node",
                    "--", *MAIN_ARGS)
    sbatch, srun = lines
    assert "--nodes=4" in sbatch and "--ntasks-per-node=1" in sbatch
    assert "--gpus-per-node=4" in sbatch
    assert srun[:2] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
    assert "--ntasks=4" in srun and "--ntasks-per-node=1" in srun
    assert srun[-len(MAIN_ARGS):] == MAIN_ARGS


def test_slurm_rejects_coordinator_flags():
    res = run("slurm.sh", "--dry-run", "--", "--process_id=0")
    assert res.returncode != 0 and len(res.stderr.splitlines()) == 1


def test_slurm_sbatch_script_execs_srun(tmp_path):
    """Run slurm.sbatch as the batch step would, with a fake srun."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(
        f"#!{sys.executable}\nimport json, sys\nprint('SRUN ' + json.dumps(sys.argv[1:]))\n")
    (fake_bin / "srun").chmod(0o755)
    env = clean_env(PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="42",
                    SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8",
                    SLURM_CPUS_PER_TASK="6")
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *MAIN_ARGS], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=10, check=False)
    assert res.returncode == 0, res.stderr
    srun_args = json.loads(res.stdout.split("SRUN ", 1)[1])
    assert srun_args == ["--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                         "--cpus-per-task=6", "python", "-m", "mixer_jax.main", *MAIN_ARGS]

    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True,
                         env=clean_env(), timeout=10, check=False)
    assert res.returncode != 0 and "sbatch" in res.stderr


# ------------------------------------------------------------------ local.sh


def test_local_dry_run():
    res = run("local.sh", "--num_processes", "3", "--devices_per_process", "2", "--port", "23456",
              "--log_dir", "/tmp/my logs", "--dry-run", "--", "--workdir=/tmp/w", *MAIN_ARGS)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert shlex.split(lines[0]) == ["cd", str(REPO)]
    assert shlex.split(lines[1]) == ["mkdir", "-p", "/tmp/my logs"]
    procs = [shlex.split(line) for line in lines[2:]]
    assert len(procs) == 3
    for i, tokens in enumerate(procs):
        assert tokens[:3] == ["env", "JAX_PLATFORMS=cpu",
                              "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
        # The repository's venv (the README's setup makes it), else plain python: the
        # README's commands work without activating anything.
        venv = REPO / ".venv" / "bin" / "python"
        assert tokens[3:6] == [str(venv) if venv.exists() else "python", "-m", "mixer_jax.main"]
        assert has_subsequence(tokens, ["--workdir=/tmp/w", *MAIN_ARGS])
        assert "--coordinator_address=localhost:23456" in tokens
        assert "--num_processes=3" in tokens
        assert f"--process_id={i}" in tokens
        assert tokens[-4:] == [">", f"/tmp/my logs/process_{i}.log", "2>&1", "&"]


STUB = """#!{python}
import json, os, sys, time
pid = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
print(json.dumps({{"argv": sys.argv[1:], "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
                  "XLA_FLAGS": os.environ.get("XLA_FLAGS")}}), flush=True)
if str(pid) == os.environ.get("STUB_FAIL_ID"):
    sys.exit(3)
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
"""


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / "stub_python"
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_local_runs_all_processes(tmp_path, stub):
    logs = tmp_path / "logs"
    res = run("local.sh", "--num_processes", "2", "--log_dir", str(logs), "--port", "23457",
              "--", "--workdir=/tmp/w", *MAIN_ARGS, env=clean_env(PYTHON=str(stub)))
    assert res.returncode == 0, res.stderr
    for i in range(2):
        assert f"process {i} exited with status 0" in res.stderr
        record = json.loads((logs / f"process_{i}.log").read_text())
        assert record["argv"] == ["-m", "mixer_jax.main", "--workdir=/tmp/w", *MAIN_ARGS,
                                  "--coordinator_address=localhost:23457", "--num_processes=2",
                                  f"--process_id={i}"]
        assert record["JAX_PLATFORMS"] == "cpu"
        assert record["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


def test_local_failure_kills_the_rest_and_propagates_exit_code(tmp_path, stub):
    start = time.time()
    res = run("local.sh", "--num_processes", "2", "--log_dir", str(tmp_path / "logs"), "--",
              "--workdir=/tmp/w", env=clean_env(PYTHON=str(stub), STUB_FAIL_ID="1", STUB_SLEEP="60"))
    assert res.returncode == 3, res.stderr
    assert time.time() - start < 8  # process 0 (sleeping 60 s) was killed
    assert "process 1 exited with status 3" in res.stderr
    assert re.search(r"process 0 exited with status \d+", res.stderr)


def test_local_rejects_coordinator_flags_after_dashdash():
    res = run("local.sh", "--num_processes", "2", "--dry-run", "--", "--process_id=1")
    assert res.returncode != 0 and len(res.stderr.splitlines()) == 1
