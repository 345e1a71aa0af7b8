#!/usr/bin/env bash
# Creates a venv with the NEWEST releases of transformers and timm (unpinned: whatever the registry has at
# the time, with what they require) layered on the project's .venv (scripts/env.sh: torch, triton and the
# test tools come from there through a .pth line, so nothing large is downloaded), in .venv-newest/ inside
# the clone. Rebuilt when older than a day. Sourced: sets NEWEST_PYTHON and prints the versions it tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
BASE_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NEWEST_VENV="${SWINV2_FAST_NEWEST_VENV:-$ROOT/.venv-newest}"
if [ ! -f "$NEWEST_VENV/.complete" ] || [ -n "$(find "$NEWEST_VENV/.complete" -mmin +1440)" ]; then
  echo "[newest-env] creating $NEWEST_VENV (the newest transformers and timm over $VENV)"
  rm -rf "$NEWEST_VENV"
  "$VENV/bin/python" -m venv --without-pip "$NEWEST_VENV"
  SITE="$("$NEWEST_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$BASE_SITE" > "$SITE/_swinv2_fast_base_venv.pth"
  # pip (and setuptools, for the editable install) come from the base venv through the .pth line
  "$NEWEST_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade transformers timm 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$NEWEST_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --no-index -e "$ROOT" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  touch "$NEWEST_VENV/.complete"
fi
NEWEST_PYTHON="$NEWEST_VENV/bin/python"
export NEWEST_PYTHON
"$NEWEST_PYTHON" -P -c 'import torch, transformers, timm, swinv2_fast; print(f"[newest-env] transformers {transformers.__version__}, timm {timm.__version__}, torch {torch.__version__}")'
