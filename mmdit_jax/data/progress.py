"""Progress lines for long loops: done/total, rate and ETA, at most one line every `every` seconds."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, what: str, total: int, unit: str = "images", every: float = 2.0, delay: float = 0.0,
                 stream=None):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.last = self.start + delay - every  # first line no sooner than `delay`
        self.done = 0

    def update(self, n: int = 1, force: bool = False):
        self.done += n
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f}/s, "
                  f"elapsed {_clock(now - self.start)}, ETA {_clock(eta)}", file=self.stream, flush=True)
