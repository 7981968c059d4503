#!/usr/bin/env bash
# The device check, run as one command on a lent GPU machine (see BENCHMARKS.md):
#   OUT=/some/dir bash benchmarks/gpu_check.sh [seconds]
# 1. the issue's benchmark command (train; eval after the profile); 2. this tree's model code against BEFORE's in one
# process (ab_models); 3. a kernel-level profile of the train step; 4. XLA flag sets and
# code variants (flag_sweep), until the time budget (default 450 s) is spent.
# ARGS overrides the model arguments. BEFORE names the baseline of step 2 (skipped when
# unset): a revision, or a models.py file in the tree, since the device copy's git
# history can end before your commits:
#   git show REV:mixer_jax/models.py > benchmarks/before_models.py   # untracked: it travels
#   BEFORE=benchmarks/before_models.py OUT=... bash benchmarks/gpu_check.sh
set -u
: "${OUT:?set OUT to the folder for the results}"
budget=${1:-450}
case $budget in ''|*[!0-9]*) echo "gpu_check.sh: the budget must be whole seconds, got '$budget'." >&2; exit 2;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
ARGS=${ARGS:-"--variant=B/16 --batch_size=256 --dtype=bfloat16"}
BEFORE=${BEFORE:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
# Programs compiled once are reused by later processes (the same program, same flags).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mixer_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
mkdir -p "$OUT/prof"
nvidia-smi -L; $PY -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
echo "== benchmark (left $(left) s)"
timeout 150 $PY -m mixer_jax.benchmark $ARGS --mode=train --steps=30 2>&1 | tee "$OUT/bench_train.txt" | tail -20
if [ -n "$BEFORE" ]; then
  echo "== ab_models --before=$BEFORE (left $(left) s)"
  timeout 200 $PY benchmarks/ab_models.py --before="$BEFORE" --mode=train --rounds=4 $ARGS 2>&1 | tee "$OUT/ab_train.txt" | tail -3
fi
echo "== profile (left $(left) s)"
timeout 150 $PY benchmarks/profile_step.py --out="$OUT/prof" $ARGS --mode=train --top=40 2>&1 | tail -45
trace=$(find "$OUT/prof/trace" -name '*.xplane.pb' | head -1)
[ -n "$trace" ] && mv "$trace" "$OUT/prof/trace.xplane.pb"
rm -rf "$OUT/prof/trace"
echo "== eval (left $(left) s)"
timeout 100 $PY -m mixer_jax.benchmark $ARGS --mode=eval --steps=30 --peak_size=0 2>&1 | tee "$OUT/bench_eval.txt" | grep -v '^{'
echo "== flag sweep (left $(left) s)"
deadline=$(( $(left) - 60 ))
if [ $deadline -gt 0 ]; then
  timeout $(( $(left) > 0 ? $(left) : 1 )) $PY benchmarks/flag_sweep.py \
    --deadline_s=$deadline --timeout_s=100 --json_out="$OUT/sweep.json" \
    --candidates=${CANDIDATES:-unfused_bias_gelu,flax_layer_norm,cublaslt,triton_gemm_any,cudnn_gemm_fusion,cublaslt_tanh_gelu,no_command_buffer,all_fusions_triton} \
    -- $ARGS --mode=train --steps=20 2>&1 | tee "$OUT/sweep.txt" | grep -v '^{'
else
  echo "no time left for the flag sweep"
fi
echo "== done after $(( $(date +%s) - start )) s"
