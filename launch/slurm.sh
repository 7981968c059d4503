#!/usr/bin/env bash
# Submit launch/slurm.sbatch with a consistent node / GPU / process layout.
# Run with --help for usage. --dry-run prints the sbatch command and the srun
# command the job would run, one per line, and runs nothing.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
SBATCH_SCRIPT="$SCRIPT_DIR/slurm.sbatch"

usage() {
  cat <<EOF
Usage: $PROG [--nodes N] [--gpus-per-node G] [--procs-per gpu|node] [options] -- MAIN_ARGS...

Submit a multi-node GPU job (launch/slurm.sbatch) that runs the same
'python -m mixer_jax.main MAIN_ARGS...' in every task via srun.

Options:
  --nodes N               nodes (default: 2)
  --gpus-per-node G       GPUs per node (default: 8)
  --procs-per MODE        gpu: one process per GPU (G tasks per node, the default)
                          node: one process per node using all its GPUs
                          (default: \$PROCS_PER, else gpu)
  --time T                wall-clock limit, e.g. 24:00:00 (default: slurm.sbatch's)
  --partition P           SLURM partition
  --account A             SLURM account
  --job-name NAME         job name (default: mixer_jax)
  --output FILE           job log file (default: %x_%j.out = mixer_jax_JOBID.out in the repo dir)
  --cpus-per-task C       CPUs per task (per node with --procs-per node)
  --sbatch-arg ARG        extra sbatch argument, e.g. --sbatch-arg=--exclusive (repeatable)
  --dry-run               print the sbatch and srun commands, run nothing
  -h, --help              show this help

Everything after '--' is passed unchanged to 'python -m mixer_jax.main'.
No coordinator flags are needed: jax.distributed.initialize() auto-detects SLURM.
The job runs in the repo dir with \$PYTHON (default: python) from the submitting
environment, so activate the venv first.

Example (2 nodes x 8 GPUs, one process per GPU):
  $PROG --nodes 2 --gpus-per-node 8 --time 48:00:00 -- \\
      --config=configs/imagenet1k_pretrain.py:B/16 --workdir=/shared/mixer_b16
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES=2
GPUS_PER_NODE=8
PROCS_PER=${PROCS_PER:-gpu}
TIME=""
PARTITION=""
ACCOUNT=""
JOB_NAME="mixer_jax"
OUTPUT=""
CPUS_PER_TASK=""
EXTRA=()
DRY_RUN=0

on_option() {
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --procs-per) PROCS_PER=$2 ;;
    --time) TIME=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --output) OUTPUT=$2 ;;
    --cpus-per-task) CPUS_PER_TASK=$2 ;;
    --sbatch-arg) EXTRA+=("$2") ;;
    --dry-run) DRY_RUN=1 ;;
  esac
}
parse_options "--nodes --gpus-per-node --procs-per --time --partition --account --job-name \
  --output --cpus-per-task --sbatch-arg" "--dry-run" "$@"

[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer"
[[ -z $CPUS_PER_TASK || $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer"
case $PROCS_PER in
  gpu) TASKS_PER_NODE=$GPUS_PER_NODE ;;
  node) TASKS_PER_NODE=1 ;;
  *) die "--procs-per must be gpu or node, got '$PROCS_PER'" ;;
esac
refuse_process_flags ": jax.distributed auto-detects SLURM" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}

SBATCH=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
  --gpus-per-node="$GPUS_PER_NODE" --chdir="$REPO_DIR")
[[ -n $TIME ]] && SBATCH+=(--time="$TIME")
[[ -n $PARTITION ]] && SBATCH+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SBATCH+=(--account="$ACCOUNT")
[[ -n $OUTPUT ]] && SBATCH+=(--output="$OUTPUT")
[[ -n $CPUS_PER_TASK ]] && SBATCH+=(--cpus-per-task="$CPUS_PER_TASK")
SBATCH+=(${EXTRA[@]+"${EXTRA[@]}"}
  --export="ALL,PROCS_PER=$PROCS_PER,MIXER_GPUS_PER_NODE=$GPUS_PER_NODE"
  "$SBATCH_SCRIPT" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})

if ((DRY_RUN)); then
  printf '%s\n' "$(qjoin "${SBATCH[@]}")"
  # Let slurm.sbatch render its srun command with the layout the job will get.
  (
    for v in $(compgen -e); do
      [[ $v == SLURM_* ]] && unset "$v"
    done
    export MIXER_SLURM_RENDER=1 PROCS_PER MIXER_GPUS_PER_NODE=$GPUS_PER_NODE \
      SLURM_JOB_NUM_NODES=$NODES
    if [[ -n $CPUS_PER_TASK ]]; then
      export SLURM_CPUS_PER_TASK=$CPUS_PER_TASK
    fi
    exec bash "$SBATCH_SCRIPT" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
  )
  exit 0
fi

printf '+ %s\n' "$(qjoin "${SBATCH[@]}")" >&2
exec "${SBATCH[@]}"
