#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv with Python 3.11 and installs swinv2_fast into it
# in editable mode with its `test` extra (pyproject.toml: everything the tests and the main job import), at
# the versions requirements/test.txt pins. Sourced by test.sh and main.sh.
# (On a machine without network, e.g. the GPU machine, use scripts/gpu.sh: it creates no venv.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SWINV2_FAST_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
STAMP="$VENV/.swinv2_fast-requirements"
WANT="$(cat "$ROOT/requirements/test.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

# pip's notes about the local mirror's missing folders are noise; its exit status is not (pipefail)
_pip() {
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV with $("$PYTHON_BIN" --version)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[env] installing into $VENV: swinv2_fast (editable) with its test extra at requirements/test.txt's versions:"
  echo "[env]   torch with its NVIDIA libraries (~4.5 GB), triton (~0.9 GB), transformers, timm, peft, pytest, ruff, mypy"
  echo "[env]   about 6 GB in all; a few minutes the first time"
  # one resolution: the pins and the extra together (a pin that contradicts the extra's floors fails here)
  _pip -r "$ROOT/requirements/test.txt" -e "$ROOT[test]" \
    || { echo "[env] pip install -r requirements/test.txt -e .[test] failed" >&2; exit 1; }
  "$VENV/bin/python" -c "import torch, transformers, timm, swinv2_fast" || { echo "[env] install failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
