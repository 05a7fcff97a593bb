#!/usr/bin/env bash
# One prepared GPU check (see bench/gpu_check.py for what it runs): CPU-side pre-checks (imports, offline data
# builds), then every CUDA path the CPU test suite cannot reach, one markdown table on stdout. No network:
# everything it needs is in the repository and its virtual environment. Budget: 8 minutes on one H100/H200
# (hard limit 480 s below).
#
#     bash bench/gpu_check.sh            # exit 0: all ok; 1: a check failed; 3: no CUDA device (pre-checks only)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export WANDB_MODE=disabled HF_HUB_OFFLINE=1

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: gpu_check: '$PY' cannot import torch; run scripts/setup.sh first" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
exec timeout 480 "$PY" -m bench.gpu_check "$@"
