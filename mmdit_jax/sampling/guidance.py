"""Guidance settings and formulas, as the diffusers pipelines apply them.

- CFG (SD3 family, and FLUX's "true CFG"): one forward over [uncond; cond], then
  v = v_uncond + w * (v_cond - v_uncond). SD3 uses it when guidance_scale > 1; FLUX when
  true_cfg_scale > 1 and a negative prompt is given.
- FLUX.1-dev: the guidance scale is an input of the network (guidance embedder), one forward per step.
- Skip-layer guidance (SD3.5-Medium, with CFG only): on steps i with N * start < i < N * stop (strict,
  step indices of the schedule being run), one more cond-only forward with `layers` bypassed:
  v <- v + (v_cond - v_skip) * scale.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmdit_jax.errors import MMDiTError


@dataclasses.dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...]
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if not self.layers:
            raise MMDiTError("skip_guidance_layers must name at least one layer")
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise MMDiTError(f"skip-layer guidance needs 0 <= start <= stop <= 1, got start "
                             f"{self.start}, stop {self.stop}")

    def active_steps(self, num_steps: int) -> np.ndarray:
        i = np.arange(num_steps)
        return (i > num_steps * self.start) & (i < num_steps * self.stop)


def cfg(v_uncond, v_cond, scale):
    return v_uncond + scale * (v_cond - v_uncond)


def skip_layer(v, v_cond, v_skip, scale):
    return v + (v_cond - v_skip) * scale
