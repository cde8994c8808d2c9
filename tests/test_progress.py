"""Progress lines (mmdit_jax/progress.py, shared by sampling, precompute, folder scans and mmdit-convert):
no rate or ETA before one is measured; on a terminal one line rewritten in place, elsewhere plain lines
at most one every `every` seconds plus the last."""
import io
import os

import pytest

from mmdit_jax import progress as P


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(P, "_clock", lambda: now[0])
    return now


def _sample(progress, clock, steps, dt):
    progress.start(steps, "sampling")
    clock[0] += 3.0  # compiling and the first transfer: start-up, not speed
    for i in range(steps):
        clock[0] += dt
        progress.tick(i)


def test_plain_lines_when_not_a_terminal(clock):
    out = io.StringIO()
    _sample(P.Progress(line=P.step_line, every=5.0, stream=out), clock, 41, 0.5)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "nan" not in text
    assert lines[0] == "sampling: step 1/41"  # nothing measured yet: no rate, no ETA
    # then at most one line every 5 s (10 steps at 2 steps/s) and the final one
    assert [ln.split(",")[0] for ln in lines] == ["sampling: step 1/41", "sampling: step 11/41",
                                                   "sampling: step 21/41", "sampling: step 31/41",
                                                   "sampling: step 41/41"]
    assert lines[1] == "sampling: step 11/41, 2.00 steps/s, ETA 0m15s"
    assert lines[-1] == "sampling: step 41/41, 2.00 steps/s, ETA 0m00s"


def test_one_line_rewritten_on_a_terminal(clock):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        assert tty.isatty()
        _sample(P.Progress(line=P.step_line, every=5.0, stream=tty), clock, 4, 0.5)
    chunks = []
    while True:  # until the closed terminal side reads as the end (EIO on Linux)
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    text = b"".join(chunks).decode()
    # every step redrawn over the last (0.5 s apart), one line break at the end (the pty makes it \r\n)
    assert text.startswith("\rsampling: step 1/4\r") and text.endswith("\r\n")
    assert text.count("\n") == 1 and "nan" not in text
    assert text.rstrip("\r\n").split("\r")[1:] == [
        "sampling: step 1/4", "sampling: step 2/4, 2.00 steps/s, ETA 0m01s",
        "sampling: step 3/4, 2.00 steps/s, ETA 0m01s", "sampling: step 4/4, 2.00 steps/s, ETA 0m00s"]


def test_messages_and_short_loops(clock):
    out = io.StringIO()
    conv = P.conversion(4 << 20, stream=out)
    conv.say("[vae] 2 arrays")
    for i in (1, 2):
        clock[0] += 2.0
        conv.update(2 << 20, component="vae", index=i, count=2)
    conv.update(0, force=True, component="vae", index=2, count=2)  # the final line is not repeated
    assert out.getvalue().splitlines() == [
        "[vae] 2 arrays", "[vae] 1/2 arrays | 2.0 MB / 4.0 MB | elapsed 0m02s",
        "[vae] 2/2 arrays | 4.0 MB / 4.0 MB | 1.0 MB/s | elapsed 0m04s | ETA 0m00s"]
    # a loop over within its `delay` says nothing; a longer one ends with its last line even short of
    # the total (files skipped)
    out = io.StringIO()
    quick = P.Progress("scanning", 3, unit="images", delay=10.0, stream=out)
    quick.update(3)
    quick.close()
    slow = P.Progress("scanning", 10, unit="images", every=10.0, delay=10.0, stream=out)
    for _ in range(8):
        clock[0] += 2.0
        slow.update()
    slow.close()
    assert out.getvalue().splitlines() == [
        "scanning: 5/10 images, 0.5/s, elapsed 0m10s, ETA 0m10s",
        "scanning: 8/10 images, 0.5/s, elapsed 0m16s, ETA 0m04s"]
