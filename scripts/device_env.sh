#!/usr/bin/env bash
# Creates (once) a venv with the GPU machine's package stack (requirements/device-stack.txt, Python 3.12)
# OUTSIDE the clone, keyed by the requirements' hash, so CI's fresh clones reuse it: the first run downloads
# several GB (torch 2.11.0 is the cu130 build), later runs take seconds. Sourced: sets DEVICE_PYTHON.
# The swinv2_fast package is not part of the stack: callers install their clone into it, editable and offline
# (`pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .`, as .ci/run and gpu.sh do), so one
# venv serves every clone (the last install decides which clone `import swinv2_fast` reads).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/device-stack.txt"
HASH="$(sha256sum "$REQ" | cut -c1-16)"
DEVICE_VENV="${SWINV2_FAST_DEVICE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/swinv2_fast/device-stack-$HASH}"
if [ -z "${DEVICE_BASE_PYTHON:-}" ]; then
  DEVICE_BASE_PYTHON="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/3.12.1/bin/python"
  [ -x "$DEVICE_BASE_PYTHON" ] || DEVICE_BASE_PYTHON="$(command -v python3.12 || true)"
fi
if [ ! -f "$DEVICE_VENV/.complete" ]; then
  [ -n "$DEVICE_BASE_PYTHON" ] && [ -x "$DEVICE_BASE_PYTHON" ] \
    || { echo "[device-env] no Python 3.12 (set DEVICE_BASE_PYTHON)" >&2; exit 1; }
  echo "[device-env] creating $DEVICE_VENV with $("$DEVICE_BASE_PYTHON" --version) (first run: several GB)"
  rm -rf "$DEVICE_VENV"
  mkdir -p "$(dirname "$DEVICE_VENV")"
  "$DEVICE_BASE_PYTHON" -m venv "$DEVICE_VENV"
  # pip's exit status decides (pipefail): a failed install stops here; only the local mirror's notes are hidden
  "$DEVICE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$DEVICE_VENV/bin/python" -c "import torch, triton, numpy, transformers, timm, peft, accelerate, setuptools"
  touch "$DEVICE_VENV/.complete"
fi
DEVICE_PYTHON="$DEVICE_VENV/bin/python"
export DEVICE_PYTHON
