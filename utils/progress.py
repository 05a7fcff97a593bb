"""Progress for every long-running command: a tqdm bar on a terminal, and where there is none (a log
file, CI, nohup, a cluster job) one plain line at least every 30 s of wall clock, with rate and ETA, so a
log never goes silent for minutes. `update()` reads the clock only: no device sync, fine in a hot loop."""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional

PLAIN_EVERY_S = 30.0


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


class Progress:
    """tqdm-like: `update(n)`, `set_postfix(dict)`, `close()`, `disable` (True when no bar is drawn)."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", initial: int = 0, leave: bool = True,
                 every_s: Optional[float] = None, enabled: bool = True, out=None):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                        disable=None if enabled else True)  # None: a bar only on a terminal
        self.disable = self.bar.disable
        self.plain = enabled and self.disable
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = PLAIN_EVERY_S if every_s is None else every_s
        self.n = self.n0 = initial
        self.t0 = self.last = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self.out = out

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable:
            self.bar.update(n)
        elif self.plain:
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                print(self.line(now), file=self.out or sys.stdout, flush=True)

    def line(self, now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = (self.total - self.n) / rate if self.total and rate > 0 else None
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc}: {done}{pct}, {rate:.3g} {self.unit}/s, elapsed {format_seconds(now - self.t0)}, "
                f"ETA {format_seconds(eta)}{extra}")

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = dict(values)
        if not self.disable:
            self.bar.set_postfix(values)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it", **kw) -> Iterator:
    """`for x in track(items, desc=...)`: Progress around an iterable."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = Progress(total, desc, unit, **kw)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
