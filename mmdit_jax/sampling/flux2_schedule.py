"""FLUX.2's sigma schedule: diffusers' Flux2Pipeline / Flux2KleinPipeline hand the scheduler the sigmas
linspace(1, 1/N, N) and a `mu` fitted to the image token count and the step count
(`compute_empirical_mu`); the scheduler's dynamic (exponential) shift then bends them.
"""
from __future__ import annotations

import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.sampling.schedules import SchedulerConfig, flow_match_sigmas

# mu is linear in the token count, fitted at 10 steps (slope, intercept) and at 200 steps; between the
# two fits it is linear in the step count. Past LARGE_SEQ_LEN tokens the 200-step fit is used alone.
MU_FIT_10_STEPS = (8.73809524e-05, 1.89833333)
MU_FIT_200_STEPS = (0.00016927, 0.45666666)
LARGE_SEQ_LEN = 4300

# FLUX.2's scheduler: FlowMatchEulerDiscreteScheduler with the dynamic exponential shift. Given sigmas
# and mu, no other field of its config (static shift, base/max shift) enters the schedule.
FLUX2_SCHEDULER = SchedulerConfig(use_dynamic_shifting=True, time_shift_type="exponential")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The shift parameter mu for `image_seq_len` image tokens ((H/16) * (W/16)) and `num_steps`."""
    a200, b200 = MU_FIT_200_STEPS
    m200 = a200 * image_seq_len + b200
    if image_seq_len > LARGE_SEQ_LEN:
        return float(m200)
    a10, b10 = MU_FIT_10_STEPS
    m10 = a10 * image_seq_len + b10
    slope = (m200 - m10) / 190.0
    intercept = m200 - 200.0 * slope
    return float(slope * num_steps + intercept)


def flux2_sigmas(num_steps: int, image_seq_len: int, cfg: SchedulerConfig = FLUX2_SCHEDULER, *,
                 sigmas=None):
    """(N + 1,) float32 sigmas ending in 0, as the FLUX.2 pipelines' scheduler holds them; `sigmas`
    replaces the default linspace(1, 1/N, N) as the pipelines' `sigmas=` argument does (mu still
    comes from `num_steps`)."""
    if num_steps < 1:
        raise MMDiTError(f"num_inference_steps must be at least 1, got {num_steps}")
    if image_seq_len < 1:
        raise MMDiTError(f"image_seq_len must be at least 1, got {image_seq_len}")
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    return flow_match_sigmas(cfg, num_steps, sigmas=sigmas, mu=compute_empirical_mu(image_seq_len, num_steps))
