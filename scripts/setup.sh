#!/usr/bin/env bash
# One-time set-up: a venv in .venv with the pinned CPU torch and every dependency.
# GPU machines: set TORCH_SPEC to the torch you want (e.g. TORCH_SPEC="torch==2.11.0") and see README "GPU extras".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
if ! .venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -r requirements-dev.txt >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2; echo "setup: pip install failed" >&2; exit 1
fi
rm -f "$log"
.venv/bin/python -c "import torch, hydra, numpy; print(f'setup ok: torch {torch.__version__}, numpy {numpy.__version__}, hydra {hydra.__version__}')"
