"""bench/gpu_check.sh cannot run its checks without a GPU; here it must parse, run its CPU-side pre-checks
(imports, offline data builds) and end with one clear error line and exit status 3."""
from __future__ import annotations

import subprocess

import pytest
import torch

from trainer_helpers import REPO


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run bash bench/gpu_check.sh itself")
def test_without_cuda_the_prechecks_run_and_it_says_so():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--small"], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert errors == ["error: gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); the CPU "
                      "pre-checks passed, no GPU check ran"]
    assert "[gpu_check] pre-checks passed" in proc.stderr and "Traceback" not in proc.stderr
