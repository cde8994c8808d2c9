"""What a run does before training and after its last step, by registered name.

- Base makers (config `base.maker`): fn(folder, cfg, options, seed) writes a complete pipeline folder
  at `folder` (a model trained from scratch still needs a VAE, text encoders and a scheduler config).
  `prepare_base` writes it into WORKDIR/base once and points model.pretrained / encoders at it.
- Evaluators (config `eval.kind`): fn(cfg, workdir, out) -> scores dict; run after the last step on the
  workdir as a pipeline folder (see training/workdir.py).
Makers that live outside the trainer register themselves when their package's train_hooks module is
imported; every lookup imports those first (mmdit_jax.plugins), so a config naming them needs no import.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.plugins import load_plugins

_BASE_MAKERS: dict[str, Callable] = {}
_EVALUATORS: dict[str, Callable] = {}
BASE_DIR = "base"


def register_base_maker(name: str, fn: Callable) -> None:
    _BASE_MAKERS[name] = fn


def register_evaluator(kind: str, fn: Callable) -> None:
    _EVALUATORS[kind] = fn


def base_makers() -> dict[str, Callable]:
    load_plugins()
    return dict(_BASE_MAKERS)


def evaluators() -> dict[str, Callable]:
    load_plugins()
    return dict(_EVALUATORS)


def prepare_base(cfg, workdir: str, out=sys.stdout, write: bool = True):
    """`cfg` itself, or (with base.maker) `cfg` training from WORKDIR/base, written there on first use.
    The maker writes atomically, so an existing folder is complete and is reused as it is (a rerun
    resumes on the same base). Only the lead process writes (`write`); the others read the shared
    workdir, as they do its checkpoints."""
    b = cfg.base
    if b.maker is None:
        return cfg
    makers = base_makers()
    if b.maker not in makers:
        raise MMDiTError(f"--set=base.maker: {b.maker!r} not registered; known: {sorted(makers)}")
    folder = paths.join(paths.absolute(workdir), BASE_DIR)
    if write and not paths.isfile(paths.join(folder, "model_index.json")):
        print(f"writing the base pipeline ({b.maker}) to {folder}", file=out, flush=True)
        makers[b.maker](folder, cfg, dict(b.options or {}), b.seed)
    return cfg.replace(model=dataclasses.replace(cfg.model, pretrained=folder), encoders=folder)


def run_evaluation(cfg, workdir: str, out=sys.stdout) -> dict | None:
    """Scores from the registered evaluator of eval.kind (None for "none")."""
    if cfg.eval.kind == "none":
        return None
    evals = evaluators()
    if cfg.eval.kind not in evals:
        raise MMDiTError(f"--set=eval.kind: {cfg.eval.kind!r} not registered; known: {sorted(evals)}")
    return evals[cfg.eval.kind](cfg, paths.absolute(workdir), out)
