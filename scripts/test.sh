#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole test suite in two pytest runs, the quick
# part (-m "not slow") and then the slow part (-m slow: compile check, fuzzing, DDP/FSDP2, the larger kernel
# and training cases), and prints the wall time of each. Extra arguments go to both runs
# (`bash scripts/test.sh -x -q tests/test_inputs.py`); with -x the slow part is skipped once the quick part
# failed. Arguments that choose markers themselves (-m ...) make it one pytest run with them.
# Exit status: non-zero when either part fails (a part that selects no test counts as passed, unless both do).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: bash scripts/test.sh [PYTEST ARGS...]

Runs swinv2_fast's test suite (what CI runs): sets up .venv on first use (Python 3.11, torch 2.14.1 and the
pinned stack of requirements/test.txt: a few minutes and ~6 GB the first time), then two pytest runs, the
quick part (-m "not slow", ~7 min on 2 cores) and the slow part (-m slow, ~20 min), and prints each part's
wall time. Arguments go to both runs (e.g. -x -q tests/test_inputs.py, -k timm); a marker expression of
your own (-m ...) makes it one run. Exit status: non-zero when either part fails.
Outputs: pytest's report on the terminal only. pytest's own options: bash scripts/test.sh -m "" --help
USAGE
    exit 0 ;;
esac

source "$ROOT/scripts/env.sh"
cd "$ROOT"

for arg in "$@"; do
  case "$arg" in
    -m|-m*) exec python -P -m pytest "$@" ;;
  esac
done

exitfirst=0
for arg in "$@"; do
  case "$arg" in
    -x|--exitfirst|--maxfail=*) exitfirst=1 ;;
  esac
done

run_part() {  # run_part MARKER_EXPRESSION ARGS...: sets rc and seconds
  local expr=$1 t0
  shift
  t0=$(date +%s)
  set +e
  python -P -m pytest -m "$expr" "$@"  # no paths given: pytest.ini's testpaths (tests/)
  rc=$?
  set -e
  seconds=$(( $(date +%s) - t0 ))
}

run_part "not slow" "$@"
quick_rc=$rc quick_s=$seconds
if [ "$quick_rc" -ne 0 ] && [ "$quick_rc" -ne 5 ] && [ "$exitfirst" = 1 ]; then
  echo "[test] quick: ${quick_s} s (failed, exit $quick_rc); slow part not run (-x)"
  exit "$quick_rc"
fi
run_part "slow" "$@"
slow_rc=$rc slow_s=$seconds

total=$(( quick_s + slow_s ))
ratio=$(awk -v q="$quick_s" -v t="$total" 'BEGIN { printf "%.2f", (t > 0 ? q / t : 0) }')
echo "[test] quick: ${quick_s} s; slow: ${slow_s} s; quick/total = ${ratio}" \
     "(exit status: quick $quick_rc, slow $slow_rc; 5 = no test selected)"
# pytest's 5: no test selected in that part (e.g. a file with no slow test); both 5: nothing ran at all
if [ "$quick_rc" -eq 5 ] && [ "$slow_rc" -eq 5 ]; then exit 5; fi
for part_rc in "$quick_rc" "$slow_rc"; do
  if [ "$part_rc" -ne 0 ] && [ "$part_rc" -ne 5 ]; then exit "$part_rc"; fi
done
exit 0
