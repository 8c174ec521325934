#!/usr/bin/env bash
# One command for a CUDA machine (no network needed), inside a wall-clock budget (default 555 s):
#   1. correctness (python -m bench.gpu_check check, ~2 min): every fused op against a float64 reference at
#      ViT-B and LLM shapes, bf16/fp16 (+ fp32), forward and every gradient, and a PACE step of a timm
#      ViT with gradient checkpointing, fused vs reference; autotuning off (first config of each list)
#      so the phase is compile-bound, the groups in parallel processes;
#   2. compute-sanitizer memcheck over every kernel at ragged shapes (python -m bench.gpu_check launch), then
#      racecheck over a representative subset (Triton uses shared memory implicitly);
#   3. the layer and model benchmarks (autotuned) and the rendered report;
#   4. optionally (PACE_TESTS_BUDGET_S > 0) the CUDA test suite with whatever time is left.
# Results: bench/results/<date>-<device>.{json,md} (benchmarks) and <date>-<device>-check.json.
# With $OUT set, these files go there flat (the device tool returns at most 8 files): verdict.txt,
# check.json, memcheck.json, racecheck.json, <stem>.json, <stem>.md and logs.tar.gz (every phase's
# log), refreshed after every phase so that a run cut short still returns what it learnt.
#
#   bash bench/run_gpu.sh
#
# Knobs (environment): PYTHON (default python3), PACE_GPU_BUDGET_S (555), PACE_CHECK_BUDGET_S (110),
# PACE_CHECK_JOBS (10; 2 in the CPU dry run), PACE_MEMCHECK_BUDGET_S (75), PACE_RACECHECK_BUDGET_S (45),
# PACE_MODEL_BUDGET_S (150; the layer benchmarks get the rest), PACE_TESTS_BUDGET_S (0: the CUDA test
# suite is not run), PACE_TEST_WORKERS (8; 0 = no xdist), PACE_INSTALL=1 (pip install -e . instead of
# PYTHONPATH), COMPUTE_SANITIZER (path), PACE_BENCH_ALLOW_CPU=1 (dry run of this script without CUDA:
# small shapes through Triton's interpreter, the driver without sanitizer, the reduced benchmark set),
# and the benchmark knobs of bench/conftest.py (PACE_BENCH_ROUNDS, PACE_BENCH_ROUND_S, ...).
# Each phase runs under `timeout -s INT`: an interrupted phase still writes what it finished.
# Exit code: 0 when the correctness check passed, the sanitizers found nothing and benchmark JSON was
# written; 1 otherwise (every file is written either way); 2 without CUDA (unless the dry run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${PACE_GPU_BUDGET_S:-555}"
CHECK_BUDGET="${PACE_CHECK_BUDGET_S:-110}"
MEMCHECK_BUDGET="${PACE_MEMCHECK_BUDGET_S:-75}"
RACECHECK_BUDGET="${PACE_RACECHECK_BUDGET_S:-45}"
MODEL_BUDGET="${PACE_MODEL_BUDGET_S:-150}"
TESTS_BUDGET="${PACE_TESTS_BUDGET_S:-0}"
REPORT_RESERVE=15

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[run_gpu $(elapsed)s] $*"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

if [ "${PACE_INSTALL:-0}" = "1" ]; then
  log "pip install --no-deps --no-build-isolation -e ."
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { log "install failed"; exit 1; }
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

CUDA=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  CUDA=0
  if [ "${PACE_BENCH_ALLOW_CPU:-0}" != "1" ]; then
    echo "run_gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)." >&2
    echo "On CPU run the reduced set instead: pytest bench --benchmark-only" >&2
    exit 2
  fi
  log "no CUDA: dry run on CPU (PACE_BENCH_ALLOW_CPU=1): small shapes, reduced set"
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
while [ -e "$STEM.json" ] || [ -e "$STEM-check.json" ]; do STEM="$RESULTS/$DATE-$DEVICE_SLUG-$n"; n=$((n + 1)); done
WORK=$(mktemp -d)
DEST="${OUT:-}"
[ -n "$DEST" ] && mkdir -p "$DEST"
NOTES=()
FINAL_RC=0

# Copy a file to $OUT (flat) and pack every log; called after each phase.
keep() {
  [ -n "$DEST" ] || return 0
  local f
  for f in "$@"; do [ -s "$f" ] && cp "$f" "$DEST/$(basename "${f#"$STEM"-}")" 2>/dev/null; done
  tar czf "$DEST/logs.tar.gz" -C "$WORK" . 2>/dev/null
  return 0
}
verdict() {  # the summary, printed at the end and kept as verdict.txt
  {
    echo "run_gpu.sh on $DEVICE_SLUG, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed)s of a ${BUDGET}s budget"
    for note in "${NOTES[@]}"; do echo "- $note"; done
  } > "$WORK/verdict.txt"
  keep "$WORK/verdict.txt"
}
ran_out() { [ "$1" = "124" ] || [ "$1" = "137" ] || [ "$1" = "130" ]; }

log "device $DEVICE_SLUG; results -> $STEM.{json,md}, $STEM-check.json; logs in $WORK; budget ${BUDGET}s"
{
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
} 2>&1 | tee "$WORK/environment.log"
# The optional packages' versions, beside the correctness phase (importing them takes seconds).
{
  "$PY" -c "import peft; print('peft', peft.__version__)" 2>/dev/null || echo "peft: not installed"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null \
    || echo "transformers: not installed"
} >> "$WORK/environment.log" 2>&1 &

# --- 1. correctness ---------------------------------------------------------------------------------
JOBS=10  # every group at once: Triton compiles on the CPU, one kernel at a time per process
[ "$CUDA" = "0" ] && JOBS=2  # the interpreter is CPU-bound: the dry run does not flood the machine
T=$(min "$CHECK_BUDGET" $(( $(left) - 60 )))
log "correctness: python -m bench.gpu_check check (timeout ${T}s, autotuning off)"
PACE_KERNELS_AUTOTUNE=0 timeout -s INT -k 15 "$T" "$PY" -m bench.gpu_check check \
  --json "$WORK/check.json" --work "$WORK" --jobs "${PACE_CHECK_JOBS:-$JOBS}" 2>&1 | tee "$WORK/check.log"
rc=${PIPESTATUS[0]}
line=$(grep -E "^gpu_check: (PASS|FAIL|INCOMPLETE)" "$WORK/check.log" | tail -1 | sed 's/^gpu_check: //')
if [ -z "$line" ]; then
  line="no verdict (exit code $rc$(ran_out "$rc" && echo ", stopped at its ${T}s budget"))"
fi
NOTES+=("correctness on the device (\`python -m bench.gpu_check check\`): $line")
[ "$rc" != "0" ] && FINAL_RC=1
[ -s "$WORK/check.json" ] && cp "$WORK/check.json" "$STEM-check.json"
keep "$WORK/check.json"
verdict
log "correctness exit code $rc"

# --- 2. compute-sanitizer ---------------------------------------------------------------------------
SAN="${COMPUTE_SANITIZER:-}"
if [ -z "$SAN" ]; then
  SAN=$(command -v compute-sanitizer 2>/dev/null \
    || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
          /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
fi
sanitize() {  # tool budget driver-args...
  local tool=$1 budget=$2
  shift 2
  if [ "$budget" -lt 20 ]; then
    NOTES+=("compute-sanitizer $tool: not run, no time left in the ${BUDGET}s budget")
    return
  fi
  local rc summary
  if [ "$CUDA" = "1" ] && [ -n "$SAN" ]; then
    local extra=()
    if [ "$tool" = "memcheck" ] && "$SAN" --help 2>/dev/null | grep -q -- "--padding"; then
      extra=(--padding 256)  # a guard zone after every allocation: small overruns land in it
    fi
    log "compute-sanitizer --tool $tool (timeout ${budget}s): gpu_check launch $*"
    # Without torch's caching allocator every tensor is its own allocation, so an access past a
    # tensor's end leaves the allocation instead of landing in a neighbour.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PACE_KERNELS_AUTOTUNE=0 timeout -s INT -k 15 "$budget" \
      "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 100 ${extra[@]+"${extra[@]}"} \
      "$PY" -m bench.gpu_check launch --json "$WORK/$tool.json" "$@" > "$WORK/$tool.log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$WORK/$tool.log" | tail -1 | sed 's/^=* *//')
    if ran_out "$rc"; then
      NOTES+=("compute-sanitizer $tool: stopped at its ${budget}s budget (${summary:-no summary}); see $tool.log")
    elif [ "$rc" = "0" ]; then
      NOTES+=("compute-sanitizer $tool (\`gpu_check launch $*\`): clean, ${summary:-no summary}")
    else
      NOTES+=("compute-sanitizer $tool: **exit code $rc** (${summary:-no summary}); see $tool.log")
    fi
  else
    local why="compute-sanitizer not found"
    [ "$CUDA" = "0" ] && why="no CUDA"
    log "$why: gpu_check launch $* without sanitizer (timeout ${budget}s)"
    timeout -s INT -k 15 "$budget" "$PY" -m bench.gpu_check launch --json "$WORK/$tool.json" "$@" \
      > "$WORK/$tool.log" 2>&1
    rc=$?
    NOTES+=("compute-sanitizer $tool: not run ($why); the driver alone exited with $rc")
  fi
  never=$(grep -E "^kernels never launched" "$WORK/$tool.log" | tail -1)
  [ -n "$never" ] && NOTES+=("$tool driver: $never")
  [ "$rc" != "0" ] && FINAL_RC=1
  tail -3 "$WORK/$tool.log"
  keep "$WORK/$tool.json"
  verdict
}
if [ "$CUDA" = "1" ]; then
  sanitize memcheck "$(min "$MEMCHECK_BUDGET" $(( $(left) - 60 )))" --dtypes bf16,fp32 --subset all
  sanitize racecheck "$(min "$RACECHECK_BUDGET" $(( $(left) - 60 )))" --dtypes bf16 --subset race
else  # the interpreter is slow: one dtype, the small subset, to exercise the driver
  sanitize memcheck "$(min "$MEMCHECK_BUDGET" $(( $(left) - 60 )))" --dtypes fp32 --subset race
fi

# --- 3. benchmarks -----------------------------------------------------------------------------------
run_bench() {  # name file budget
  local name=$1 file=$2 budget=$3
  if [ "$budget" -lt 20 ]; then
    NOTES+=("$name benchmarks: not run, no time left in the ${BUDGET}s budget")
    log "$name: no time left"
    return
  fi
  log "pytest bench/$file (timeout ${budget}s)"
  timeout -s INT -k 20 "$budget" "$PY" -m pytest "bench/$file" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$WORK/$name.json" --benchmark-columns=min,median,rounds,iterations \
    > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -2 "$WORK/$name.log"
  if ran_out "$rc"; then
    NOTES+=("$name benchmarks: stopped at their ${budget}s budget; the groups that finished are shown")
  elif [ "$rc" != "0" ]; then
    NOTES+=("$name benchmarks: pytest exit code $rc (see $name.log)")
  fi
  log "$name exit code $rc"
  keep
}
run_bench layers test_layers.py $(( $(left) - MODEL_BUDGET - TESTS_BUDGET - REPORT_RESERVE ))
run_bench model test_model.py $(( $(left) - TESTS_BUDGET - REPORT_RESERVE ))

JSONS=()
for f in "$WORK/layers.json" "$WORK/model.json"; do [ -s "$f" ] && JSONS+=("$f"); done
if [ ${#JSONS[@]} -eq 0 ]; then
  NOTES+=("benchmarks: no JSON was written")
  FINAL_RC=1
else
  NOTE_ARGS=()
  for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
  NOTE_ARGS+=(--note "command: \`bash bench/run_gpu.sh\` ($(elapsed)s before the report)")
  "$PY" -m bench.report "${JSONS[@]}" --merge-json "$STEM.json" -o "$STEM.md" "${NOTE_ARGS[@]}" \
    > "$WORK/report.log" 2>&1 || NOTES+=("report: bench.report failed (see report.log)")
  [ -n "$DEST" ] && cp "$STEM.json" "$STEM.md" "$DEST"/ 2>/dev/null
  NOTES+=("benchmarks: $(basename "$STEM").json and .md")
fi
keep
verdict

# --- 4. the CUDA test suite (opt-in) -------------------------------------------------------------------
if [ "$TESTS_BUDGET" -gt 0 ]; then
  T=$(min "$TESTS_BUDGET" $(( $(left) - 5 )))
  if [ "$T" -ge 30 ]; then
    XDIST=()
    WORKERS="${PACE_TEST_WORKERS:-8}"
    if [ "$WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); fi
    log "pytest tests ${XDIST[*]} (timeout ${T}s)"
    timeout -s INT -k 15 "$T" "$PY" -m pytest tests -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
      > "$WORK/tests.log" 2>&1
    rc=$?
    summary=$(grep -E "(passed|failed|error|no tests ran)" "$WORK/tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    NOTES+=("CUDA test suite (\`pytest tests\`): ${summary:-no summary}, exit code $rc$(ran_out "$rc" && echo ", stopped at ${T}s")")
    [ "$rc" != "0" ] && FINAL_RC=1
  else
    NOTES+=("CUDA test suite: not run, ${T}s left")
  fi
else
  NOTES+=("CUDA test suite: not run (PACE_TESTS_BUDGET_S=0; the correctness phase covers the kernels)")
fi

verdict
log "done in $(elapsed)s"
echo "===== verdict ====="
cat "$WORK/verdict.txt"
echo "results: $STEM.json, $STEM.md, $STEM-check.json; logs: $WORK${DEST:+; copied to $DEST}"
[ "$CUDA" = "0" ] && [ "$FINAL_RC" = "0" ] && echo "(dry run on CPU: the numbers say nothing about a GPU)"
exit "$FINAL_RC"
