#!/usr/bin/env bash
# Start N mixer_jax processes on this machine (CPU only), wired together with
# jax.distributed: a local stand-in for a multi-host job.
# Run with --help for usage. --dry-run prints every command, one per line, and
# runs nothing.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

usage() {
  cat <<EOF
Usage: $PROG --num_processes N [--devices_per_process D] [--port PORT] [--log_dir DIR] [--dry-run] -- MAIN_ARGS...

Start N CPU processes of '\$PYTHON -m mixer_jax.main MAIN_ARGS...' (PYTHON: the
repository's .venv/bin/python when it exists, else python) on
localhost (from the repo root). Process i also gets
  --coordinator_address=localhost:PORT --num_processes=N --process_id=i
and the environment JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D (D CPU devices per process).
Each process logs to LOG_DIR/process_<i>.log. The launcher waits for all of
them and prints each exit status; if one exits non-zero, the others are killed
and the launcher exits with that status.

Options:
  --num_processes N        number of processes (required)
  --devices_per_process D  CPU devices per process (default: 1)
  --port PORT              coordinator port on localhost (default: 12355)
  --log_dir DIR            per-process logs (default: /tmp/mixer_local_logs)
  --dry-run                print every command, one per line, run nothing
  -h, --help               show this help
(--num-processes, --devices-per-process and --log-dir are accepted too.)

Example (2 processes x 1 CPU device):
  $PROG --num_processes 2 -- --config=configs/default.py --workdir=/tmp/mixer_local
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NUM_PROCESSES=""
DEVICES_PER_PROCESS=1
PORT=12355
LOG_DIR=/tmp/mixer_local_logs
DRY_RUN=0

on_option() {
  case $1 in
    --num_processes | --num-processes) NUM_PROCESSES=$2 ;;
    --devices_per_process | --devices-per-process) DEVICES_PER_PROCESS=$2 ;;
    --port) PORT=$2 ;;
    --log_dir | --log-dir) LOG_DIR=$2 ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
  esac
}
parse_options "--num_processes --num-processes --devices_per_process --devices-per-process \
  --port --log_dir --log-dir" "--dry-run --dry_run" "$@"

[[ -n $NUM_PROCESSES ]] || die "--num_processes is required"
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer"
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer"
[[ $PORT =~ ^[1-9][0-9]*$ ]] && ((PORT <= 65535)) || die "--port must be a TCP port number"
[[ -n $LOG_DIR ]] || die "--log_dir must not be empty"
refuse_process_flags " after '--': $PROG sets it" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}

# The repository's venv (what the README's setup makes) unless PYTHON names another.
if [[ -z ${PYTHON:-} && -x $REPO_DIR/.venv/bin/python ]]; then
  PYTHON=$REPO_DIR/.venv/bin/python
fi
PYTHON=${PYTHON:-python}
XLA_FLAGS_VALUE="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
COORDINATOR="localhost:$PORT"

# The command of process i (without redirection).
process_cmd() {
  CMD=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$XLA_FLAGS_VALUE"
    "$PYTHON" -m mixer_jax.main ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
    --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" --process_id="$1")
}

log_file() { printf '%s/process_%s.log' "$LOG_DIR" "$1"; }

if ((DRY_RUN)); then
  printf '%s\n' "$(qjoin cd "$REPO_DIR")"
  printf '%s\n' "$(qjoin mkdir -p "$LOG_DIR")"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_cmd "$i"
    printf '%s > %s 2>&1 &\n' "$(qjoin "${CMD[@]}")" "$(q "$(log_file "$i")")"
  done
  exit 0
fi

cd "$REPO_DIR"
mkdir -p "$LOG_DIR"

PIDS=()      # pid of process i ("" once it has been reaped)
STATUS=()    # exit status of process i ("" while running)

kill_running() { # kill_running SIGNAL
  local i
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    if [[ -n ${PIDS[i]} ]]; then
      kill "-$1" "${PIDS[i]}" 2>/dev/null || true
    fi
  done
}

# Reap every process that has finished; returns once all are reaped.
reap_finished() {
  local i rc
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    [[ -n ${PIDS[i]} ]] || continue
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      rc=0
      wait "${PIDS[i]}" || rc=$?
      STATUS[i]=$rc
      PIDS[i]=""
      printf '%s: process %d exited with status %d (log: %s)\n' "$PROG" "$i" "$rc" \
        "$(log_file "$i")" >&2
    fi
  done
}

running() {
  local p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do
    [[ -n $p ]] && return 0
  done
  return 1
}

# Kill the rest, give them a few seconds to exit, then SIGKILL.
stop_all() {
  kill_running TERM
  local deadline=$((SECONDS + 10))
  while running && ((SECONDS < deadline)); do
    reap_finished
    sleep 0.1
  done
  if running; then
    kill_running KILL
    while running; do
      reap_finished
      sleep 0.1
    done
  fi
}

on_signal() {
  trap - INT TERM
  printf '%s: interrupted, stopping all processes\n' "$PROG" >&2
  stop_all
  exit 130
}
trap on_signal INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_cmd "$i"
  "${CMD[@]}" >"$(log_file "$i")" 2>&1 &
  PIDS[i]=$!
  STATUS[i]=""
  printf '%s: started process %d (pid %d): %s\n' "$PROG" "$i" "${PIDS[i]}" "$(qjoin "${CMD[@]}")" >&2
done

FAILED=""
while running; do
  reap_finished
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    if [[ -n ${STATUS[i]} && ${STATUS[i]} != 0 ]]; then
      FAILED=$i
      break 2
    fi
  done
  sleep 0.1
done

if [[ -n $FAILED ]]; then
  CODE=${STATUS[FAILED]}
  printf '%s: process %d failed with status %d; stopping the others. Last lines of %s:\n' \
    "$PROG" "$FAILED" "$CODE" "$(log_file "$FAILED")" >&2
  tail -n 20 "$(log_file "$FAILED")" | sed 's/^/    /' >&2 || true
  stop_all
  exit "$CODE"
fi
printf '%s: all %d processes exited with status 0\n' "$PROG" "$NUM_PROCESSES" >&2
