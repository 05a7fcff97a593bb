"""retain_freed_host_memory (utils/modeling.py): with glibc, a freed activation-sized block is reused by the
next allocation of that size instead of being returned to the kernel and faulted in again."""
import platform
import resource

import pytest
import torch

from utils.modeling import retain_freed_host_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    assert retain_freed_host_memory() and retain_freed_host_memory()  # applied, and idempotent
    n = 2 ** 21  # 8 MiB of fp32: above glibc's default mmap threshold, like a demo step's activations
    for _ in range(5):  # the heap grows to its steady size first
        torch.ones(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(n)  # allocated, written, freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Returned to the kernel each time, these would fault 20 x 2048 pages in again.
    assert faults < 2048, faults
