"""Shared helpers of the dataset-builder tests."""
from __future__ import annotations

import hashlib
from pathlib import Path


def digest(root: Path) -> str:
    """SHA-256 over every file below `root` (relative path + bytes, in sorted order): equal digests mean
    byte-identical builds."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()
