"""Scalars to TensorBoard event files and a JSONL log (WORKDIR/metrics.jsonl), from process 0 only.

On resume, JSONL records after the restored step are dropped (they were logged by the interrupted run
after its last checkpoint and are about to be logged again), so the log reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import os

from mmdit_jax.io.files import atomic_file


class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        if resume_step is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        else:
            _truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter

        # purge_step makes TensorBoard hide events the interrupted run wrote past the checkpoint
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))

    def image(self, step: int, tag: str, image) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with atomic_file(path, "w") as f:
        f.writelines(keep)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
