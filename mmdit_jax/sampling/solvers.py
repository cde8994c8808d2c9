"""Samplers as per-step coefficient tables (computed on the host) plus one pure update (run in the loop).

euler: diffusers' FlowMatchEulerDiscreteScheduler.step, x <- x + (s_next - s) * v, dt in float32.
dpmpp_2m: DPM-Solver++(2M) as the SD3.5 reference (`sd3_impls.sample_dpmpp_2m`) runs it on flow
latents: with denoised D = x - s * v, lambda = -log(s), h = log(s / s_next),
    x <- (s_next / s) * x + (1 - s_next / s) * D'
where D' = D on the first and the final (s_next = 0) step, and otherwise
    D' = (1 + 1/(2r)) D - 1/(2r) D_prev,   r = h_prev / h.
(Not diffusers' DPMSolverMultistep flow variant, whose lambda is log((1 - s) / s).)
"""
from __future__ import annotations

import numpy as np

from mmdit_jax.errors import MMDiTError

SOLVERS = ("euler", "dpmpp_2m")


def step_table(solver: str, sigmas) -> dict[str, np.ndarray]:
    """Per-step float32 arrays (length N) the update reads, from (N + 1,) sigmas."""
    s = np.asarray(sigmas, np.float32)
    if solver == "euler":
        return {"dt": s[1:] - s[:-1]}
    if solver == "dpmpp_2m":
        s64 = s.astype(np.float64)
        cur, nxt = s64[:-1], s64[1:]
        ratio = nxt / cur
        c_d, c_old = 1.0 - ratio, np.zeros_like(ratio)
        for i in range(1, len(cur)):
            if nxt[i] == 0:
                continue
            h, h_last = np.log(cur[i] / nxt[i]), np.log(s64[i - 1] / cur[i])
            r = h_last / h
            c_d[i] = (1.0 - ratio[i]) * (1.0 + 1.0 / (2.0 * r))
            c_old[i] = -(1.0 - ratio[i]) / (2.0 * r)
        return {"ratio": ratio.astype(np.float32), "c_d": c_d.astype(np.float32),
                "c_old": c_old.astype(np.float32)}
    raise MMDiTError(f"unknown sampler {solver!r}; expected one of {', '.join(SOLVERS)}")


def check(solver: str):
    if solver not in SOLVERS:
        raise MMDiTError(f"unknown sampler {solver!r}; expected one of {', '.join(SOLVERS)}")
    return solver


def update(solver: str, x, v, sigma, prev_denoised, coef):
    """One step: (new x, denoised to remember). x, v float32; sigma scalar; coef this step's table row."""
    if solver == "euler":
        return x + coef["dt"] * v, prev_denoised
    denoised = x - sigma * v
    x = coef["ratio"] * x + coef["c_d"] * denoised + coef["c_old"] * prev_denoised
    return x, denoised
