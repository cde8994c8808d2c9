"""Per-step progress of a jitted sampling loop: the loop calls `tick(i)` through `jax.debug.callback`,
so the loop stays one compiled program while the host prints step/total, rate and ETA."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stream=None):
        self.stream = stream
        self.total, self.label, self._t_first, self._done = 0, "", None, 0

    def start(self, total: int, label: str = "sampling"):
        self.total, self.label, self._t_first, self._done = int(total), label, None, 0

    def tick(self, i):
        """Host side of the device callback; i is the 0-based step just finished."""
        now = time.perf_counter()
        self._done = max(self._done, int(i) + 1)
        if self._t_first is None:  # the first step carries no rate (it may include a transfer)
            self._t_first, rate, eta = now, float("nan"), float("nan")
        else:
            rate = (self._done - 1) / max(now - self._t_first, 1e-9)
            eta = (self.total - self._done) / rate
        stream = self.stream or sys.stderr
        end = "\n" if self._done >= self.total else ""
        stream.write(f"\r{self.label}: step {self._done}/{self.total}, {rate:.2f} steps/s, "
                     f"ETA {eta:.1f}s{end}")
        stream.flush()
