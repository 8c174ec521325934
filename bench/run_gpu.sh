#!/usr/bin/env bash
# One command for a CUDA machine (no network needed): the CUDA test suite, then the full layer and
# model benchmarks, then the rendered report, all inside a wall-clock budget (default 530 s, under
# 9 minutes). Writes bench/results/<date>-<device>.json and .md; the logs stay in a temporary folder
# (printed at the end) and are copied, with the results, to $OUT when that is set.
#
#   bash bench/run_gpu.sh
#
# Knobs (environment): PYTHON (default python3), PACE_GPU_BUDGET_S (530), PACE_TESTS_BUDGET_S (170),
# PACE_MODEL_BUDGET_S (140), PACE_TEST_WORKERS (8; 0 = no xdist), PACE_GPU_SKIP_TESTS=1,
# PACE_INSTALL=1 (pip install --no-deps --no-build-isolation -e . instead of PYTHONPATH),
# PACE_BENCH_ALLOW_CPU=1 (dry run of this script without CUDA: the reduced CPU set), and the
# benchmark knobs of bench/conftest.py (PACE_BENCH_ROUNDS, PACE_BENCH_ROUND_S, ...).
# Each phase runs under `timeout -s INT`: an interrupted pytest still writes the benchmarks it
# finished, and the report says which phase ran out of time. Exit code: 0, or 1 when the test suite
# did not pass or no benchmark JSON was written (the results are written either way), 2 without CUDA.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${PACE_GPU_BUDGET_S:-530}"
TESTS_BUDGET="${PACE_TESTS_BUDGET_S:-170}"
MODEL_BUDGET="${PACE_MODEL_BUDGET_S:-140}"
REPORT_RESERVE=20

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[run_gpu $(elapsed)s] $*"; }

if [ "${PACE_INSTALL:-0}" = "1" ]; then
  log "pip install --no-deps --no-build-isolation -e ."
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { log "install failed"; exit 1; }
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${PACE_BENCH_ALLOW_CPU:-0}" != "1" ]; then
    echo "run_gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)." >&2
    echo "On CPU run the reduced set instead: pytest bench --benchmark-only" >&2
    exit 2
  fi
  log "no CUDA: dry run on CPU (PACE_BENCH_ALLOW_CPU=1), reduced set"
fi

DEVICE_SLUG=$("$PY" - <<'EOF'
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")
EOF
)
DATE=$(date +%Y-%m-%d)
RESULTS="$ROOT/bench/results"
mkdir -p "$RESULTS"
STEM="$RESULTS/$DATE-$DEVICE_SLUG"
n=2
while [ -e "$STEM.json" ]; do STEM="$RESULTS/$DATE-$DEVICE_SLUG-$n"; n=$((n + 1)); done
WORK=$(mktemp -d)
NOTES=()
FINAL_RC=0
log "device $DEVICE_SLUG; results -> $STEM.{json,md}; budget ${BUDGET}s"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true

# --- 1. the CUDA test suite ------------------------------------------------------------------------
if [ "${PACE_GPU_SKIP_TESTS:-0}" != "1" ]; then
  T=$(( TESTS_BUDGET < $(left) - 60 ? TESTS_BUDGET : $(left) - 60 ))
  XDIST=()
  WORKERS="${PACE_TEST_WORKERS:-8}"
  if [ "$WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); fi
  log "pytest tests ${XDIST[*]} (timeout ${T}s)"
  timeout -s INT -k 15 "$T" "$PY" -m pytest tests -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} 2>&1 \
    | tee "$WORK/tests.log"
  rc=${PIPESTATUS[0]}
  summary=$(grep -E "(passed|failed|error|no tests ran)" "$WORK/tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  if [ "$rc" = "124" ] || [ "$rc" = "137" ]; then
    NOTES+=("CUDA test suite: stopped at its ${T}s budget (${summary:-no summary})")
  else
    NOTES+=("CUDA test suite (\`pytest tests\`): ${summary:-no summary}, exit code $rc")
  fi
  log "tests exit code $rc"
  [ "$rc" != "0" ] && FINAL_RC=1
else
  NOTES+=("CUDA test suite: skipped (PACE_GPU_SKIP_TESTS=1)")
fi

# --- 2. layer benchmarks ---------------------------------------------------------------------------
run_bench() {  # name file budget
  local name=$1 file=$2 budget=$3
  if [ "$budget" -lt 20 ]; then
    NOTES+=("$name benchmarks: not run, no time left in the ${BUDGET}s budget")
    log "$name: no time left"
    return
  fi
  log "pytest bench/$file (timeout ${budget}s)"
  timeout -s INT -k 20 "$budget" "$PY" -m pytest "bench/$file" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$WORK/$name.json" --benchmark-columns=min,median,rounds,iterations 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = "124" ] || [ "$rc" = "137" ]; then
    NOTES+=("$name benchmarks: stopped at their ${budget}s budget; the groups that finished are shown")
  elif [ "$rc" != "0" ]; then
    NOTES+=("$name benchmarks: pytest exit code $rc (see $name.log)")
  fi
  log "$name exit code $rc"
}

run_bench layers test_layers.py $(( $(left) - MODEL_BUDGET - REPORT_RESERVE ))
run_bench model test_model.py $(( $(left) - REPORT_RESERVE ))

# --- 3. report -------------------------------------------------------------------------------------
JSONS=()
for f in "$WORK/layers.json" "$WORK/model.json"; do [ -s "$f" ] && JSONS+=("$f"); done
if [ ${#JSONS[@]} -eq 0 ]; then
  log "no benchmark JSON was written; logs in $WORK"
  [ -n "${OUT:-}" ] && cp "$WORK"/*.log "$OUT"/ 2>/dev/null
  exit 1
fi
NOTE_ARGS=()
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
NOTE_ARGS+=(--note "command: \`bash bench/run_gpu.sh\` ($(elapsed)s before the report)")
"$PY" -m bench.report "${JSONS[@]}" --merge-json "$STEM.json" -o "$STEM.md" "${NOTE_ARGS[@]}"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$STEM.json" "$STEM.md" "$WORK"/*.log "$OUT"/ 2>/dev/null
  log "copied results and logs to $OUT"
fi
log "done in $(elapsed)s"
echo "results: $STEM.json"
echo "report:  $STEM.md"
echo "logs:    $WORK"
[ "$FINAL_RC" = "0" ] || echo "run_gpu.sh: the CUDA test suite did not pass (see the report's notes)" >&2
exit "$FINAL_RC"
