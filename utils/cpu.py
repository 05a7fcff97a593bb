"""Facts about the host CPU from /proc/cpuinfo (Linux), for choices that depend on the CPU model."""
from __future__ import annotations

from typing import Optional


def cpuinfo_field(key: str, cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The value of the first `key : value` line of `cpuinfo` (e.g. "flags", "vendor_id"), or None when the
    file or the key is missing (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None
