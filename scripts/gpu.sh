#!/usr/bin/env bash
# The one command for a GPU machine with no network (e.g. a 15-minute loan of an H200):
#
#     bash scripts/gpu.sh OUT_DIR            # on the GPU machine, from a fresh copy of the repo
#     bash scripts/gpu.sh --smoke OUT_DIR    # the same steps on a CPU machine (CI runs this)
#
# Uses the machine's own python3 (or $PYTHON), never creates a venv, installs nothing from an index: the
# project is installed offline in editable mode (pip --no-index --no-deps --no-build-isolation --use-pep517; setuptools
# must be there). Setup problems stop it in its first seconds. Then, each step under its own time budget,
# the whole within 8 minutes (a step that runs out is cut and says so; the later steps still run):
#   1. tests   tests/test_gpu.py: the compiled kernels on CUDA tensors at the real shapes (smoke: Triton's
#              interpreter on CPU tensors at tiny shapes), ~2-3 min
#   2. bench   python -m benchmarks.main --preset gpu (smoke: --preset smoke), ~4 min, cases ordered by importance
#   3. sweep   optional hook: `python -m tools.sweep OUT_DIR` when that module exists (a short
#              tile sweep, ~1 min; it may write one file, OUT_DIR/tuned_tiles.json); skipped otherwise
#   4. report  OUT_DIR/summary.txt: step statuses, test pass/fail counts, every ratio, % of HBM bandwidth
# Everything lands in OUT_DIR (the only thing that comes back from the GPU machine), at most 8 files:
#   environment.txt  tests.log  bench.log  results.csv  <device>.png  sweep.log  [tuned_tiles.json]  summary.txt
# Budgets (seconds) can be changed with GPU_SH_BUDGET_{TOTAL,TESTS,BENCH,SWEEP}.
set -uo pipefail

usage() {
  # the header comment above, as the help text
  sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then usage; exit 0; fi
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu.sh [--smoke] OUT_DIR   (bash scripts/gpu.sh --help: what it does)" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"

START=$(date +%s)
if [ "$SMOKE" = 1 ]; then
  # CPU: the interpreter is slow and a shared machine slower still; the whole stays within 10 minutes
  TOTAL=${GPU_SH_BUDGET_TOTAL:-600}; B_TESTS=${GPU_SH_BUDGET_TESTS:-370}
  B_BENCH=${GPU_SH_BUDGET_BENCH:-170}; B_SWEEP=${GPU_SH_BUDGET_SWEEP:-40}
else
  TOTAL=${GPU_SH_BUDGET_TOTAL:-480}; B_TESTS=${GPU_SH_BUDGET_TESTS:-150}
  B_BENCH=${GPU_SH_BUDGET_BENCH:-270}; B_SWEEP=${GPU_SH_BUDGET_SWEEP:-45}
fi
# seconds kept for the report at the end (it imports torch and matplotlib: slow on a busy 2-core machine)
REPORT_RESERVE=$([ "$SMOKE" = 1 ] && echo 45 || echo 15)

# no network on the GPU machine: nothing may try it (pip, the hub)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

STEPS="$OUT/.steps"  # one line per step: name status seconds (folded into summary.txt, then removed)
: > "$STEPS"
log() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*"; }
fail_setup() { log "SETUP FAILED: $*"; echo "setup failed: $*" > "$OUT/summary.txt"; rm -f "$STEPS"; exit 1; }

# ------------------------------------------------------------------------------------------------ setup
log "mode: $([ "$SMOKE" = 1 ] && echo "smoke (CPU, interpreter, tiny shapes)" || echo GPU); out: $OUT; python: $PY"
command -v "$PY" >/dev/null 2>&1 || fail_setup "no $PY"
if [ "$SMOKE" = 0 ]; then
  command -v nvidia-smi >/dev/null 2>&1 || fail_setup "no nvidia-smi: not a GPU machine (use --smoke)"
fi
# the project, offline (editable: the checkout's kernels/ is installed as swinv2_fast.kernels); needs no torch
"$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --use-pep517 -e "$ROOT" > "$OUT/install.tmp" 2>&1 \
  || { cat "$OUT/install.tmp"; rm -f "$OUT/install.tmp"; fail_setup "pip install -e . (offline) failed"; }
rm -f "$OUT/install.tmp"
# one interpreter start (torch imports in seconds on the GPU machine, longer on a busy CPU): every package
# the run needs, CUDA, swinv2_fast from this checkout; then what the run is on, into environment.txt
(
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $([ "$SMOKE" = 1 ] && echo smoke || echo gpu)"
  echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  ( cd "$OUT" && SMOKE="$SMOKE" ROOT="$ROOT" "$PY" "$ROOT/benchmarks/gpu_setup_check.py" ) || exit $?
  if command -v nvidia-smi >/dev/null 2>&1; then echo; nvidia-smi 2>&1; fi
  true
) > "$OUT/environment.txt" 2>&1 || { cat "$OUT/environment.txt"; fail_setup "$(grep '^SETUP:' "$OUT/environment.txt" | head -1)"; }
log "environment recorded ($(grep -E '^(torch|triton|device):' "$OUT/environment.txt" | tr '\n' ' '))"

# ------------------------------------------------------------------------------------------------ steps
# budget for a step: its own, but never past the total deadline minus what the report needs
budget_for() {
  local own=$1 left=$(( TOTAL - ($(date +%s) - START) - REPORT_RESERVE ))
  [ "$left" -lt "$own" ] && own=$left
  echo "$own"
}
# run_step NAME BUDGET LOG CMD...: SIGINT at the budget (pytest and the benchmark print what they have),
# SIGKILL 10 s later; records "NAME ok|failed|cut|skipped SECONDS"
run_step() {
  local name=$1 budget=$2 logfile=$3; shift 3
  if [ "$budget" -lt 5 ]; then
    log "$name: skipped, no time left"; echo "$name skipped 0" >> "$STEPS"; echo "skipped: no time left" > "$logfile"
    return
  fi
  log "$name: start (budget ${budget}s) -> $(basename "$logfile")"
  local t0=$(date +%s) rc
  timeout --signal=INT --kill-after=10 "$budget" "$@" > "$logfile" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ] || { [ $rc -eq 130 ] && [ $dt -ge "$budget" ]; }; then
    status=cut; echo "=== CUT: the step ran out of its ${budget}s budget ===" >> "$logfile"
  elif [ $rc -ne 0 ]; then
    status=failed; echo "=== exit status $rc ===" >> "$logfile"
  fi
  log "$name: $status after ${dt}s (exit $rc); tail:"; tail -n 4 "$logfile" | sed 's/^/    /'
  echo "$name $status $dt" >> "$STEPS"
}

if [ "$SMOKE" = 1 ]; then
  # for the tests only (the benchmark refuses to time the interpreter); SWINV2_FAST_SMOKE: tests/test_gpu.py
  # runs its tiny CPU mode instead of skipping without CUDA
  export TRITON_INTERPRET=1 SWINV2_FAST_SMOKE=1
else
  export TRITON_INTERPRET=0
fi
run_step tests "$(budget_for "$B_TESTS")" "$OUT/tests.log" \
  "$PY" -P -m pytest tests/test_gpu.py -v -p no:cacheprovider -o console_output_style=classic --durations=10
unset TRITON_INTERPRET SWINV2_FAST_SMOKE

PRESET=$([ "$SMOKE" = 1 ] && echo smoke || echo gpu)
BENCH_BUDGET=$(budget_for "$B_BENCH")
# the benchmark cuts its own cases at its budget minus a margin for its last case and the chart
run_step bench "$BENCH_BUDGET" "$OUT/bench.log" \
  "$PY" -m benchmarks.main --preset "$PRESET" --out-dir "$OUT" --budget "$(( BENCH_BUDGET > 60 ? BENCH_BUDGET - 30 : BENCH_BUDGET / 2 + 1 ))"

# Optional tile-sweep hook: runs only when the checkout has a sweep module (tools/sweep.py, called
# with OUT_DIR; it must finish within its budget and write at most one file there, tuned_tiles.json).
if [ "$SMOKE" = 1 ]; then
  # the sweep times compiled kernels and refuses without CUDA (its plumbing is tested in tests/test_sweep.py)
  log "sweep: skipped (smoke: the tile sweep needs a CUDA device)"; echo "sweep skipped 0" >> "$STEPS"
  echo "skipped: smoke mode (the tile sweep times compiled kernels on a CUDA device)" > "$OUT/sweep.log"
elif [ -f "$ROOT/tools/sweep.py" ]; then  # tools/ is not installed: run from the repository root
  run_step sweep "$(budget_for "$B_SWEEP")" "$OUT/sweep.log" "$PY" -m tools.sweep "$OUT"
else
  log "sweep: skipped (no tools/sweep.py)"; echo "sweep skipped 0" >> "$STEPS"
fi

# ----------------------------------------------------------------------------------------------- report
"$PY" -m benchmarks.gpu_report "$OUT" --steps "$STEPS" --elapsed "$(( $(date +%s) - START ))" > "$OUT/summary.txt" 2>&1
REPORT_RC=$?
rm -f "$STEPS"
cat "$OUT/summary.txt"
log "done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT" | sed 's/^/    /'
exit $REPORT_RC
