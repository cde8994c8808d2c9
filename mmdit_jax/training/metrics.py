"""Scalars to TensorBoard event files and a JSONL log (WORKDIR/metrics.jsonl), from process 0 only.

On resume, JSONL records after the restored step are dropped (they were logged by the interrupted run
after its last checkpoint and are about to be logged again), so the log reads as one uninterrupted run.

A workdir on a bucket (objects cannot be appended to): the JSONL log is rewritten whole at each record
(one object, so never half-written), and TensorBoard's event files are written to a local folder and
uploaded at each record and at close.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from mmdit_jax.io import paths
from mmdit_jax.io.files import atomic_file


class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = paths.join(workdir, "metrics.jsonl")
        self._tb = None
        self.remote = paths.is_remote(self.path)
        if not enabled:
            return
        if resume_step is None:
            paths.remove(self.path)
        else:
            _truncate_after(self.path, resume_step)
        # a bucket's log is kept here and rewritten whole
        self._lines = _read_lines(self.path) if self.remote else None
        from tensorboardX import SummaryWriter

        self._tb_url = paths.join(workdir, "tensorboard") if self.remote else None
        tb_dir = tempfile.mkdtemp(prefix="mmdit-tb-") if self.remote else paths.join(workdir, "tensorboard")
        # purge_step makes TensorBoard hide events the interrupted run wrote past the checkpoint
        self._tb = SummaryWriter(tb_dir, purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": int(step), **scalars}) + "\n"
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(line)
            return
        self._lines.append(line)
        with atomic_file(self.path, "w") as f:
            f.writelines(self._lines)
        self.flush()

    def image(self, step: int, tag: str, image) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._upload()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload()
            if self.remote:
                shutil.rmtree(self._tb.logdir, ignore_errors=True)
            self._tb = None

    def _upload(self) -> None:
        if self._tb_url is None:
            return
        local = self._tb.logdir
        for rel in paths.files_under(local):
            paths.upload(os.path.join(local, rel), paths.join(self._tb_url, rel))


def _read_lines(path: str) -> list[str]:
    if not paths.isfile(path):
        return []
    with paths.open(path) as f:
        return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
    if not paths.isfile(path):
        return
    keep = [line for line in _read_lines(path) if json.loads(line)["step"] <= step]
    with atomic_file(path, "w") as f:
        f.writelines(keep)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in _read_lines(path)]
