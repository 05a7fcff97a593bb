"""Test-wide setup: no network, no accounts, small thread count, shared data located once."""
import itertools
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """The trainer tests' tiny 4x4 Sudoku set (64 train / 32 test puzzles), built once per module."""
    from trainer_helpers import build_tiny_sudoku
    return build_tiny_sudoku(tmp_path_factory.mktemp("data") / "sudoku4")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: extra threads only add synchronisation, and on
    a busy 2-core machine spinning OpenMP threads slow such tests down 10x or more. Restored afterwards.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_cpuinfo(tmp_path):
    """Writes a minimal /proc/cpuinfo look-alike: `fake_cpuinfo(vendor=..., flags=...)` -> its path."""
    written = itertools.count()

    def write(vendor: str = "GenuineIntel", flags: str = "") -> str:
        path = tmp_path / f"cpuinfo-{next(written)}"
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: Some CPU\n"
                        f"flags\t\t: fpu sse avx2 {flags}\n\n")
        return str(path)
    return write
