#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the demo (parity against transformers and timm, CPU img/s).
# Extra arguments go to benchmarks/main.py (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python benchmarks/main.py "$@"
