"""Progress lines for long conversions: arrays done, bytes, rate and ETA, at most one line a second."""
from __future__ import annotations

import sys
import time


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total_bytes: int, stream=None, every: float = 1.0):
        self.total, self.done = max(int(total_bytes), 1), 0
        self.stream = stream if stream is not None else sys.stdout
        self.every, self.start, self.last = every, time.monotonic(), 0.0

    def say(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def update(self, component: str, nbytes: int, index: int, count: int, force: bool = False) -> None:
        self.done += int(nbytes)
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        # the first second's rate is mostly start-up: no ETA from it
        eta = _fmt_time((self.total - self.done) / rate) if rate > 0 and elapsed >= 2 else "--"
        self.say(f"[{component}] {index}/{count} arrays | {_fmt_bytes(self.done)} / {_fmt_bytes(self.total)} "
                 f"| {_fmt_bytes(rate)}/s | elapsed {_fmt_time(elapsed)} | ETA {eta}")
