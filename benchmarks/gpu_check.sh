#!/usr/bin/env bash
# The device check, one command on a lent GPU machine (see BENCHMARKS.md):
#   pip install -e .    # once, where mixer_jax is not installed yet
#   OUT=/some/dir bash benchmarks/gpu_check.sh [seconds]
# Runs the README's benchmark commands (train and eval of B/16 in bfloat16 at batch 256,
# device RandAugment's cost beside that step, then a kernel-level profile of its train
# step, then S/16 and L/16 alike) until the time budget (default 450 s) is spent; a run
# that would not fit is skipped and says so.
# Writes at most 5 files to $OUT: bench.txt (every run's output), bench.jsonl (one
# JSON line per run), profile.json, hlo.txt and trace.xplane.pb (profile_step.py's).
set -u
: "${OUT:?set OUT to the folder for the results}"
budget=${1:-450}
case $budget in ''|*[!0-9]*) echo "gpu_check.sh: the budget must be whole seconds, got '$budget'." >&2; exit 2;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
# Programs compiled once are reused by later processes (the same program, same flags).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mixer_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
nvidia-smi -L; $PY -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"

# run NEEDED_S CAP_S LABEL COMMAND...: runs COMMAND if NEEDED_S seconds are left, for at
# most CAP_S (or what is left), its output appended to bench.txt.
run() {
  local needed=$1 cap=$2 label=$3; shift 3
  if [ "$(left)" -lt "$needed" ]; then
    echo "== $label: skipped, $(left) s left" | tee -a "$OUT/bench.txt"; return
  fi
  echo "== $label (left $(left) s)" | tee -a "$OUT/bench.txt"
  timeout $(( $(left) < cap ? $(left) : cap )) "$@" 2>&1 | tee -a "$OUT/bench.txt" | grep -v '^{'
}

bench() {  # bench VARIANT MODE
  run 60 150 "$1 $2" $PY -m mixer_jax.tools.benchmark --variant="$1" --batch_size=256 \
    --dtype=bfloat16 --mode="$2" --steps=30
}

bench B/16 train
bench B/16 eval
# Device RandAugment 2/15 beside the B/16 bf16 step (issue 33): FLOPs, bytes, time, img/s.
run 90 200 "randaugment cost B/16" $PY benchmarks/randaugment_cost.py --time_variant=B/16 \
  --time_batch=256 --dtype=bfloat16 --steps=10
prof=$(mktemp -d)
run 90 150 "profile B/16 train" $PY benchmarks/profile_step.py --out="$prof" --variant=B/16 \
  --batch_size=256 --dtype=bfloat16 --mode=train --top=40
[ -f "$prof/profile.json" ] && mv "$prof/profile.json" "$prof/hlo.txt" "$OUT/"
trace=$(find "$prof" -name '*.xplane.pb' | head -1)
[ -n "$trace" ] && mv "$trace" "$OUT/trace.xplane.pb"
rm -rf "$prof"
for variant in S/16 L/16; do
  bench $variant train
  bench $variant eval
done
grep '^{' "$OUT/bench.txt" > "$OUT/bench.jsonl"
echo "== done after $(( $(date +%s) - start )) s"
