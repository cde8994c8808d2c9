"""Sigma schedules: diffusers' FlowMatchEulerDiscreteScheduler (static or dynamic shift), BFL's
`get_schedule`, user-given sigmas, and the img2img truncation by strength.

Every schedule is an (N + 1,) float32 array of sigmas ending in 0 (1 = pure noise). The diffusers
schedule reproduces the scheduler bit for bit, including its float32/float64 mix and its quirk of
shifting the already-shifted sigma_min again (SPEC.md), so parity holds for any scheduler config.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from mmdit_jax.io import paths
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.sources import read_json

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# Config switches of that scheduler this package does not implement: refuse rather than ignore them.
UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
               "stochastic_sampling")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    @classmethod
    def from_dict(cls, cfg: dict, origin: str = "scheduler_config.json") -> "SchedulerConfig":
        name = cfg.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise MMDiTError(f"{origin}: scheduler {name!r} is not supported (expected {SCHEDULER_CLASS})")
        on = [k for k in UNSUPPORTED if cfg.get(k)]
        if on:
            raise MMDiTError(f"{origin}: {', '.join(on)} not supported")
        if cfg.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise MMDiTError(f"{origin}: time_shift_type must be 'exponential' or 'linear'")
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        vals = {k: cfg[k] for k in fields if cfg.get(k) is not None}
        try:
            return cls(**{**fields, **vals})
        except TypeError as e:
            raise MMDiTError(f"{origin}: {e}") from None


def read_scheduler_config(path) -> SchedulerConfig:
    """The scheduler config of a model folder: `scheduler/scheduler_config.json` of a diffusers pipeline
    (or a folder holding one). The one place other folder kinds plug in."""
    path = paths.local(os.fspath(path))
    for candidate in (os.path.join(path, "scheduler", "scheduler_config.json"),
                      os.path.join(path, "scheduler_config.json")):
        if os.path.isfile(candidate):
            return SchedulerConfig.from_dict(read_json(candidate), candidate)
    raise MMDiTError(f"{path}: no scheduler/scheduler_config.json (a diffusers pipeline folder is needed "
                     "for sampling)")


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """mu, linear in the image token count between (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _time_shift(kind: str, mu: float, t):
    # exponential: e^mu / (e^mu + (1/t - 1)); linear: mu / (mu + (1/t - 1)); dtype follows t
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def _static_shift(shift: float, s):
    return shift * s / (1 + (shift - 1) * s)


def flow_match_sigmas(cfg: SchedulerConfig, num_steps: int, *, sigmas=None, mu: float | None = None):
    """(N + 1,) float32 sigmas exactly as FlowMatchEulerDiscreteScheduler.set_timesteps builds them."""
    if cfg.use_dynamic_shifting and mu is None:
        raise MMDiTError("this scheduler uses dynamic shifting: mu (from the image size) is required")
    n_train = cfg.num_train_timesteps
    if sigmas is None:
        if num_steps < 1:
            raise MMDiTError(f"num_inference_steps must be at least 1, got {num_steps}")
        # the training table (float32), shifted when static; its ends give the inference range
        table = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
        if not cfg.use_dynamic_shifting:
            table = _static_shift(cfg.shift, table)
        s_max, s_min = float(table[0]), float(table[-1])
        s = np.linspace(s_max * n_train, s_min * n_train, num_steps) / n_train  # float64 from here
    else:
        s = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
        if s.ndim != 1 or s.size < 1:
            raise MMDiTError(f"sigmas must be a non-empty 1-D list, got shape {s.shape}")
    if cfg.use_dynamic_shifting:
        s = _time_shift(cfg.time_shift_type, mu, s)
    else:
        s = _static_shift(cfg.shift, s)
    if cfg.shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return np.concatenate([np.asarray(s).astype(np.float32), np.zeros(1, np.float32)])


def timesteps_of(sigmas, num_train_timesteps: int = 1000):
    """The timesteps the diffusers scheduler pairs with `sigmas` (float32 sigma * 1000, final 0 dropped)."""
    return np.asarray(sigmas[:-1], np.float32) * np.float32(num_train_timesteps)


def bfl_sigmas(num_steps: int, image_seq_len: int, base_shift=0.5, max_shift=1.15, shift=True):
    """BFL's `get_schedule`: linspace(1, 0, N + 1), then the exponential shift with mu linear in the
    token count through (256, base_shift) and (4096, max_shift); schnell uses shift=False."""
    if num_steps < 1:
        raise MMDiTError(f"num_inference_steps must be at least 1, got {num_steps}")
    t = np.linspace(1, 0, num_steps + 1).astype(np.float32)
    if shift:
        mu = calculate_shift(image_seq_len, 256, 4096, base_shift, max_shift)
        with np.errstate(divide="ignore"):  # t = 0 gives 1/0 = inf and a final sigma of exactly 0
            t = (math.exp(mu) / (math.exp(mu) + (1 / t - 1))).astype(np.float32)
    return t


def truncate_for_strength(sigmas, strength: float):
    """img2img: the tail of an (N + 1,) schedule left for `strength` in [0, 1], as diffusers'
    get_timesteps cuts it (t_start = int(N - min(N * strength, N)))."""
    if not 0.0 <= strength <= 1.0:
        raise MMDiTError(f"strength must be in [0, 1], got {strength}")
    n = len(sigmas) - 1
    t_start = int(max(n - min(n * strength, n), 0))
    if n - t_start < 1:
        raise MMDiTError(f"strength {strength} with {n} steps leaves no denoising step; raise either")
    return sigmas[t_start:]
