"""Training timesteps: sigma densities (SD3 paper section 3.1) and the resolution-dependent shift.

Samplers map uniform / normal draws to sigma in [0, 1] (1 = pure noise); the shift then moves mass
towards noise for larger images: s' = a*s / (1 + (a - 1)*s). The drawn sigma is kept >= SIGMA_MIN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# uniform and cosmap draw u = 0 (sigma = 0) with float32 probability, where sigma_sqrt weighting is 1/0;
# diffusers' training scripts never go below the 1000-step scheduler's smallest sigma either
SIGMA_MIN = 1e-3


def sample_unshifted(key, n: int, cfg) -> jax.Array:
    """(n,) float32 sigmas from cfg.sampler (a TimestepConfig)."""
    if cfg.sampler == "logit_normal":
        return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (n,), jnp.float32))
    u = jax.random.uniform(key, (n,), jnp.float32)
    if cfg.sampler == "uniform":
        return u
    if cfg.sampler == "mode":
        return 1 - u - cfg.mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)
    if cfg.sampler == "cosmap":
        return 1 - 1 / (jnp.tan(math.pi * u / 2) + 1)
    raise ValueError(f"unknown timestep sampler {cfg.sampler!r}")


def shift_factor(cfg, latent_hw: tuple[int, int], patch: int = 2, vae_scale: int = 8) -> float:
    """The shift `a` for latents of spatial size latent_hw (1.0 = no shift). Static per batch shape."""
    h, w = latent_hw
    if cfg.shift == "none":
        return 1.0
    if cfg.shift == "fixed":
        return float(cfg.shift_value)
    if cfg.shift == "resolution":
        # the SD3 paper's sqrt(m/n) for pixel counts: shift_value at reference_resolution**2 pixels
        return float(cfg.shift_value * math.sqrt(h * w * vae_scale ** 2 / cfg.reference_resolution ** 2))
    if cfg.shift == "flux":
        # diffusers' calculate_shift: mu linear in the image token count, a = e^mu
        tokens = (h // patch) * (w // patch)
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
        return float(math.exp(cfg.base_shift + slope * (tokens - cfg.base_seq_len)))
    raise ValueError(f"unknown shift {cfg.shift!r}")


def apply_shift(sigma, a: float):
    return a * sigma / (1 + (a - 1) * sigma)


def sample_sigmas(key, n: int, cfg, latent_hw: tuple[int, int]) -> jax.Array:
    return jnp.maximum(apply_shift(sample_unshifted(key, n, cfg), shift_factor(cfg, latent_hw)), SIGMA_MIN)
