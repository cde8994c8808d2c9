"""Progress of long loops (sampling steps, precompute, folder scans, conversions) and the durations the
training log prints, in one place.

A rate and an ETA appear only once they are measurable: the clock starts at the first unit done (what
comes before it, compiling or opening files, is start-up, not speed), so the first line has neither.
On a terminal the line is rewritten in place (carriage return), at most every TTY_EVERY seconds;
anywhere else (a log file, CI) plain lines go out, at most one every LOG_EVERY seconds, plus the last.
"""
from __future__ import annotations

import sys
import time

TTY_EVERY = 0.1  # seconds between redraws of a terminal line
LOG_EVERY = 10.0  # seconds between lines anywhere else
_clock = time.monotonic


def duration(seconds: float) -> str:
    """4m05s, or 2h03m past an hour."""
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def count_line(p: Progress) -> str:
    """precompute: 40/100 images, 3.2/s, elapsed 0m12s, ETA 0m18s"""
    text = f"{p.label}: {p.done}/{p.total} {p.unit}".rstrip()
    if p.rate is not None:
        text += f", {p.rate:.1f}/s"
    text += f", elapsed {duration(p.elapsed)}"
    return text + (f", ETA {duration(p.eta)}" if p.eta is not None else "")


def step_line(p: Progress) -> str:
    """sampling: step 3/20, 2.10 steps/s, ETA 0m08s"""
    text = f"{p.label}: step {p.done}/{p.total}"
    if p.rate is not None:
        text += f", {p.rate:.2f} steps/s, ETA {duration(p.eta)}"
    return text


def bytes_line(p: Progress) -> str:
    """[transformer] 12/40 arrays | 1.2 GB / 4.0 GB | 310.5 MB/s | elapsed 0m04s | ETA 0m09s"""
    parts = [f"[{p.info.get('component', p.label)}] {p.info.get('index', 0)}/{p.info.get('count', 0)} arrays",
             f"{size(p.done)} / {size(p.total)}"]
    if p.rate is not None:
        parts.append(f"{size(p.rate)}/s")
    parts.append(f"elapsed {duration(p.elapsed)}")
    if p.eta is not None:
        parts.append(f"ETA {duration(p.eta)}")
    return " | ".join(parts)


def conversion(total_bytes: int, stream=None) -> Progress:
    """mmdit-convert's report: bytes over all components, on stdout with its other lines."""
    return Progress("convert", max(int(total_bytes), 1), line=bytes_line,
                    stream=stream if stream is not None else sys.stdout)


class Progress:
    """`done` of `total` units, reported through `line(self)` to `stream` (stderr when None, looked up
    at each write), a plain line at most every `every` seconds when that is not a terminal. `delay`:
    nothing is shown in the first `delay` seconds (quick loops stay quiet).
    `update(n)` adds n units (extra keywords go to `info` for the line), `tick(i)` marks 0-based step i
    done (a jitted loop's host callback), `say(msg)` prints a message line, `close()` ends the report
    with its last line if anything was shown."""

    def __init__(self, label: str = "", total: int = 0, *, unit: str = "", every: float = LOG_EVERY,
                 delay: float = 0.0, stream=None, line=count_line):
        self.label, self.unit, self.every, self.delay, self.line = label, unit, every, delay, line
        self.stream = stream
        self.start(total)

    def start(self, total: int, label: str | None = None) -> None:
        """Resets the counts and clocks for a new run of `total` units."""
        self.total, self.done, self.info = int(total), 0, {}
        if label is not None:
            self.label = label
        self.t0 = _clock()
        self._first = None  # (time, done) at the first unit done: where the rate is measured from
        self._last = None  # when a line was last written
        self._final_at = None  # (done, info) when the last line written was a final one
        self._open = 0  # length of an unfinished terminal line (0: none)

    # -- measures ------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return _clock() - self.t0

    @property
    def rate(self) -> float | None:
        """Units per second since the first unit done; None until a later one is done."""
        if self._first is None:
            return None
        t, d = self._first
        dt = _clock() - t
        return (self.done - d) / dt if self.done > d and dt > 0 else None

    @property
    def eta(self) -> float | None:
        r = self.rate
        return None if r is None else max(self.total - self.done, 0) / r

    # -- reporting -----------------------------------------------------------------------------------
    def update(self, n: float = 1, force: bool = False, **info) -> None:
        self.done += n
        self.info.update(info)
        now = _clock()
        if self._first is None and self.done > 0:
            self._first = (now, self.done)
        final = force or (self.total > 0 and self.done >= self.total)
        self._report(now, final)

    def tick(self, i) -> None:
        """Host side of a device callback: step i (0-based) is done."""
        self.update(max(int(i) + 1 - self.done, 0))

    def say(self, msg: str) -> None:
        stream = self._stream()
        self._end_line(stream, clear=True)
        stream.write(msg + "\n")
        stream.flush()

    def close(self) -> None:
        """The last line, if lines were shown and the last one was not (a loop may end short of
        `total`)."""
        if self._last is not None and self._final_at is None:
            self._report(_clock(), True)

    def _stream(self):
        return self.stream if self.stream is not None else sys.stderr

    def _end_line(self, stream, clear: bool = False) -> None:
        if self._open:
            stream.write("\r" + " " * self._open + "\r" if clear else "\n")
            self._open = 0

    def _report(self, now: float, final: bool) -> None:
        if self._last is None and now - self.t0 < self.delay:
            return  # a loop done within `delay` says nothing
        said = (self.done, sorted(self.info.items()))
        if final and self._final_at == said:
            return  # already said
        stream = self._stream()
        tty = is_terminal(stream)
        if not final and self._last is not None and now - self._last < (TTY_EVERY if tty else self.every):
            return
        self._last, self._final_at = now, said if final else None
        text = self.line(self)
        if tty:
            # pad over what is left of a longer previous line
            stream.write("\r" + text + " " * max(self._open - len(text), 0))
            self._open = max(len(text), 1)
            if final:
                self._end_line(stream)
        else:
            stream.write(text + "\n")
        stream.flush()
