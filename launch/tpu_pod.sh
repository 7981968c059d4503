#!/usr/bin/env bash
# Start mixer_jax training on every host of a Cloud TPU VM (pod slice).
#
# Every worker of a TPU pod slice must run the SAME training command: JAX
# auto-detects the pod (jax.distributed.initialize() with no arguments), so
# no coordinator flags are passed. A job started on only some workers hangs
# in initialization until it times out.
#
# Run with --help for usage. --dry-run prints every command, one per line,
# and runs nothing.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF
Usage: $PROG {create|run|logs|stop|delete|all} --name NAME --zone ZONE [options] [-- MAIN_ARGS...]

Start the same 'python -m mixer_jax.main' command on every worker of a TPU VM.

Subcommands:
  create   create the TPU VM (or, with --spot, a queued resource holding it)
  run      copy the repo to all workers, install the venv there, start training
           on all workers in the background (log: ~/mixer_logs/worker_<i>.log)
  logs     fetch ~/mixer_logs/* from every worker into --log-dir
  stop     kill (SIGTERM) the training process on all workers
  delete   delete the TPU VM (or, with --spot, the queued resource and its VM)
  all      create, then run

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              zone, e.g. us-central2-b (required)
  --accelerator-type TYPE  e.g. v4-32 (required for create/all)
  --version VERSION        TPU runtime version (default: tpu-ubuntu2204-base)
  --spot                   use 'gcloud compute tpus queued-resources create ... --spot'
                           (run/all wait until the queued resource is ACTIVE)
  --qr-name NAME           queued resource name with --spot (default: NAME-qr)
  --project PROJECT        passed as --project to every gcloud command
  --repo-dir DIR           repo to copy to the workers (default: $(dirname "$SCRIPT_DIR"))
  --workdir DIR            --workdir for mixer_jax.main: gs://... or a path on the
                           workers (required for run/all)
  --python PY              interpreter that creates ~/mixer_venv on the workers (default:
                           auto = python3 if >= 3.11, else python3.11, apt-installed if missing)
  --env KEY=VALUE          environment variable for the training process (repeatable)
  --exclude PATTERN        extra tar --exclude pattern when copying the repo (repeatable;
                           .git .venv __pycache__ .pytest_cache workdirs are always excluded)
  --skip-install           run: don't (re)install the venv on the workers
  --num-workers N          logs: number of workers (default: asked from gcloud)
  --log-dir DIR            logs: local destination (default: ./mixer_logs/NAME)
  --wait-timeout SECONDS   --spot: give up waiting for ACTIVE after this long (0 = never; default 0)
  --dry-run                print every command, one per line, and run nothing
  -h, --help               show this help

Everything after '--' is passed unchanged to 'python -m mixer_jax.main'.

Example (v4-32 spot pod, Mixer-B/16 ImageNet-1k pretraining):
  $PROG all --name mixer-b16 --zone us-central2-b --accelerator-type v4-32 --spot \\
      --workdir gs://MY_BUCKET/mixer_b16 -- --config=configs/imagenet1k_pretrain.py:B/16
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Run a command, or only print it with --dry-run.
run_cmd() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(qjoin "$@")"
  else
    printf '+ %s\n' "$(qjoin "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------- options
SUBCOMMAND=""
NAME=""
ZONE=""
ACCELERATOR_TYPE=""
RUNTIME_VERSION="tpu-ubuntu2204-base"
SPOT=0
QR_NAME=""
PROJECT=""
REPO_DIR=$(dirname "$SCRIPT_DIR")
WORKDIR=""
REMOTE_PYTHON="auto"
ENV_VARS=()
EXCLUDES=()
SKIP_INSTALL=0
NUM_WORKERS=""
LOG_DIR=""
WAIT_TIMEOUT=0
DRY_RUN=0

on_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --version) RUNTIME_VERSION=$2 ;;
    --spot) SPOT=1 ;;
    --qr-name) QR_NAME=$2 ;;
    --project) PROJECT=$2 ;;
    --repo-dir) REPO_DIR=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --python) REMOTE_PYTHON=$2 ;;
    --env) ENV_VARS+=("$2") ;;
    --exclude) EXCLUDES+=("$2") ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --num-workers) NUM_WORKERS=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --wait-timeout) WAIT_TIMEOUT=$2 ;;
    --dry-run) DRY_RUN=1 ;;
  esac
}
on_positional() {
  [[ -z $SUBCOMMAND ]] || die "unexpected argument '$1' (try --help)"
  SUBCOMMAND=$1
}
parse_options "--name --zone --accelerator-type --version --qr-name --project --repo-dir \
  --workdir --python --env --exclude --num-workers --log-dir --wait-timeout" \
  "--spot --skip-install --dry-run" "$@"

case $SUBCOMMAND in
  create | run | logs | stop | delete | all) ;;
  "") die "missing subcommand: create, run, logs, stop, delete or all (try --help)" ;;
  *) die "unknown subcommand '$SUBCOMMAND' (try --help)" ;;
esac

[[ -n $NAME ]] || die "--name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' must be lowercase letters, digits and hyphens"
[[ -n $ZONE ]] || die "--zone is required"
[[ -z $QR_NAME ]] && QR_NAME="$NAME-qr"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds"
[[ -z $NUM_WORKERS || $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer"
[[ -z $LOG_DIR ]] && LOG_DIR="./mixer_logs/$NAME"
for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
done
if [[ $SUBCOMMAND == create || $SUBCOMMAND == all ]]; then
  [[ -n $ACCELERATOR_TYPE ]] || die "--accelerator-type is required for $SUBCOMMAND"
fi
if [[ $SUBCOMMAND == run || $SUBCOMMAND == all ]]; then
  [[ -n $WORKDIR ]] || die "--workdir is required for $SUBCOMMAND"
  [[ -d $REPO_DIR ]] || die "--repo-dir '$REPO_DIR' is not a directory"
  REPO_DIR=$(cd "$REPO_DIR" && pwd)
  [[ -f $REPO_DIR/requirements.txt ]] || die "no requirements.txt in --repo-dir '$REPO_DIR'"
fi
if [[ ${#MAIN_ARGS[@]} -gt 0 ]] && [[ $SUBCOMMAND != run && $SUBCOMMAND != all ]]; then
  die "arguments after '--' are only used by run and all"
fi

GCLOUD_EXTRA=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_EXTRA+=(--project="$PROJECT")

REMOTE_REPO='~/mixer_jax'   # expanded on the workers
REMOTE_VENV='~/mixer_venv'
REMOTE_LOGS='~/mixer_logs'

ssh_all() { # ssh_all REMOTE_COMMAND
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_EXTRA[@]}" --worker=all --command="$1"
}

# ---------------------------------------------------------------- subcommands
do_create() {
  if ((SPOT)); then
    run_cmd gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$NAME" \
      "${GCLOUD_EXTRA[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$RUNTIME_VERSION" --spot
  else
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_EXTRA[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
  fi
}

# With --spot, the VM exists only once the queued resource is ACTIVE.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_EXTRA[@]}"
    --format='value(state.state)')
  if ((DRY_RUN)); then
    run_cmd "${describe[@]}"
    return
  fi
  local start=$SECONDS state
  printf '+ %s  (polling until ACTIVE)\n' "$(qjoin "${describe[@]}")" >&2
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        die "queued resource $QR_NAME is $state" ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      die "queued resource $QR_NAME still ${state:-unknown} after ${WAIT_TIMEOUT}s"
    fi
    printf '%s: queued resource %s is %s; waiting\n' "$PROG" "$QR_NAME" "${state:-unknown}" >&2
    sleep 30
  done
}

jax_tpu_requirement() {
  local version
  version=$(sed -n 's/^[[:space:]]*jax[[:space:]]*==[[:space:]]*\([^[:space:];#]*\).*/\1/p' \
    "$REPO_DIR/requirements.txt" | head -n 1)
  if [[ -n $version ]]; then
    printf 'jax[tpu]==%s' "$version"
  else
    printf 'jax[tpu]'
  fi
}

env_prefix() { # "KEY=value " words for --env, quoted for the remote shell
  local out="" kv
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    out+="${kv%%=*}=$(q "${kv#*=}") "
  done
  printf '%s' "$out"
}

main_command() { # the training command every worker runs (a shell string)
  printf '%s/bin/python -m mixer_jax.main %s' "$REMOTE_VENV" \
    "$(qjoin "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
}

do_run() {
  ((SPOT)) && wait_active

  # 1. Stage a clean copy of the repo (no venv, no .git) and copy it to all workers.
  local stage="${TMPDIR:-/tmp}/mixer_jax_stage.$NAME" tar_excludes=() p
  for p in ./.git ./.venv ./workdirs __pycache__ .pytest_cache ${EXCLUDES[@]+"${EXCLUDES[@]}"}; do
    tar_excludes+=("--exclude=$p")
  done
  ((DRY_RUN)) || trap "rm -rf $(q "$stage")" EXIT  # also when a later step fails
  run_cmd rm -rf "$stage"
  run_cmd mkdir -p "$stage/mixer_jax"
  run_cmd tar -C "$REPO_DIR" "${tar_excludes[@]}" -cf "$stage/repo.tar" .
  run_cmd tar -C "$stage/mixer_jax" -xf "$stage/repo.tar"
  ssh_all "rm -rf $REMOTE_REPO && mkdir -p $REMOTE_LOGS"
  run_cmd gcloud compute tpus tpu-vm scp --recurse "$stage/mixer_jax" "$NAME:" \
    "${GCLOUD_EXTRA[@]}" --worker=all
  run_cmd rm -rf "$stage"

  # 2. Install the venv on all workers (jax[tpu] pinned to requirements.txt's jax).
  #    requirements.txt needs Python >= 3.11; tpu-ubuntu2204-base ships 3.10, so with
  #    --python auto the workers use python3.11 from apt when python3 is older.
  if ((!SKIP_INSTALL)); then
    local pick_py venv=$REMOTE_VENV
    local new_enough="import sys; sys.exit(sys.version_info < (3, 11))"
    if [[ $REMOTE_PYTHON == auto ]]; then
      pick_py="PY=python3; python3 -c $(q "$new_enough") 2>/dev/null || PY=python3.11"
    else
      pick_py="PY=$(q "$REMOTE_PYTHON")"
    fi
    ssh_all "cd $REMOTE_REPO || exit 1; $pick_py; \
if ! $venv/bin/python -c $(q "$new_enough") 2>/dev/null || [ ! -x $venv/bin/pip ]; then \
rm -rf $venv; \$PY -m venv $venv 2>/dev/null || { rm -rf $venv; sudo apt-get update -q && \
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q \$PY \$PY-venv && \$PY -m venv $venv; } \
|| exit 1; fi; \
$venv/bin/pip install -q --upgrade pip && \
$venv/bin/pip install -q -r requirements.txt $(q "$(jax_tpu_requirement)")"
  fi

  # 3. Start the same command on all workers, detached from the ssh session.
  #    The worker index comes from the TPU metadata server (hostname as fallback).
  ssh_all "mkdir -p $REMOTE_LOGS && cd $REMOTE_REPO || exit 1; \
W=\$(curl -sf -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
|| hostname); \
$(env_prefix)nohup $(main_command) > $REMOTE_LOGS/worker_\$W.log 2>&1 < /dev/null & \
echo \"worker \$W: started pid \$! (log $REMOTE_LOGS/worker_\$W.log)\""
}

do_logs() {
  local n=$NUM_WORKERS i
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_EXTRA[@]}"
    --format='value(networkEndpoints.len())')
  if [[ -z $n ]]; then
    if ((DRY_RUN)); then
      run_cmd "${describe[@]}"
      printf '%s: dry-run: worker count unknown, showing worker 0 only (pass --num-workers N)\n' \
        "$PROG" >&2
      n=1
    else
      printf '+ %s\n' "$(qjoin "${describe[@]}")" >&2
      n=$("${describe[@]}")
      [[ $n =~ ^[1-9][0-9]*$ ]] || die "could not get the worker count of $NAME (got '$n')"
    fi
  fi
  run_cmd mkdir -p "$LOG_DIR"
  # gcloud refuses --worker=all when copying *to* this machine: one scp per worker.
  # Log names differ per worker (worker_<i>.log), so they don't overwrite each other.
  for ((i = 0; i < n; i++)); do
    run_cmd gcloud compute tpus tpu-vm scp "$NAME:mixer_logs/*" "$LOG_DIR/" \
      "${GCLOUD_EXTRA[@]}" --worker="$i"
  done
}

do_stop() {
  # The [.] keeps the pattern from matching the ssh shell running this command.
  ssh_all "pkill -TERM -f 'mixer_jax[.]main' && echo stopped || echo 'nothing running'"
}

do_delete() {
  if ((SPOT)); then
    run_cmd gcloud compute tpus queued-resources delete "$QR_NAME" "${GCLOUD_EXTRA[@]}" \
      --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_EXTRA[@]}" --quiet
  fi
}

case $SUBCOMMAND in
  create) do_create ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  all)
    do_create
    do_run
    ;;
esac
