"""Shared helpers of the dataset-builder tests."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def digest(root: Path) -> str:
    """SHA-256 over every file below `root` (relative path + bytes, in sorted order): equal digests mean
    byte-identical builds."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def arc_task_tree(root: Path, training: list[Path], evaluation: list[Path]) -> Path:
    """Copy ARC task files into root/training and root/evaluation (the two subsets the ARC builder splits on)."""
    for sub, chosen in (("training", training), ("evaluation", evaluation)):
        (root / sub).mkdir(parents=True)
        for f in chosen:
            shutil.copy(f, root / sub / f.name)
    return root
