#!/usr/bin/env bash
# The fast checks, first in CI (seconds once the environment exists): ruff's lint rules, ruff's formatter in
# check mode and mypy, each configured in pyproject.toml. Stops at the first that fails.
#   bash scripts/lint.sh          # check
#   bash scripts/lint.sh --fix    # apply ruff's safe fixes and format, then check
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [ "${1:-}" = "--fix" ]; then
  ruff check --fix --quiet . || true
  ruff format --quiet .
fi
echo "[lint] ruff check";         ruff check .
echo "[lint] ruff format --check"; ruff format --check .
echo "[lint] mypy";               mypy
