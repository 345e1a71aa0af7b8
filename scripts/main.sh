#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the demo (parity against transformers and timm, CPU img/s).
# Rows and the chart go to the untracked benchmarks/local-results/ unless --commit-results is given (then
# the committed benchmarks/results/results.csv and its chart). Extra arguments go to python -m benchmarks.main
# (see --help). On a GPU machine without network use scripts/gpu.sh instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m benchmarks.main "$@"
