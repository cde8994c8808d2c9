"""The rectified-flow objective: x_t = (1 - s) x0 + s eps, the network regresses eps - x0.

Loss weightings as in diffusers' compute_loss_weighting_for_sd3; text dropout as in the SD3 paper
(each encoder dropped independently) plus whole-caption dropout to the empty caption (for CFG).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmdit_jax.training.timesteps import sample_sigmas


def loss_weight(sigma, weighting: str):
    if weighting == "none":
        return jnp.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    raise ValueError(f"unknown loss weighting {weighting!r}")


def draw_noise(key, x0, tcfg):
    """(sigma (B,), eps like x0) for one batch of latents x0 (B, h, w, C)."""
    k_sigma, k_eps = jax.random.split(key)
    sigma = sample_sigmas(k_sigma, x0.shape[0], tcfg, x0.shape[1:3])
    return sigma, jax.random.normal(k_eps, x0.shape, jnp.float32)


def flow_loss(apply_fn, params, x0, eps, sigma, context, pooled, guidance, weighting: str):
    """Mean over the batch of weight(sigma) * mean((v(x_t) - (eps - x0))^2) over each sample's
    elements; computed in float32 whatever the network's dtype."""
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = (1 - s) * x0 + s * eps
    pred = apply_fn(params, x_t, sigma, context, pooled, guidance).astype(jnp.float32)
    per_sample = jnp.mean((pred - (eps - x0)) ** 2, axis=tuple(range(1, x0.ndim)))
    return jnp.mean(loss_weight(sigma, weighting) * per_sample)


def distill_loss(student_fn, params, mode, frozen, x0, eps, sigma, context, pooled, null_context, null_pooled,
                 guidance, weighting: str, *, compute, teacher_guidance: float = 1.0):
    """Guidance distillation: the student at guidance g regresses the teacher's CFG velocity
    v_u + g (v_c - v_u) at the same x_t (one student forward, no CFG batch for it), per-sample g.
    `null_context` None (data without an empty-caption encoding): the unconditional text is zeros."""
    if null_context is None:
        null_context = jnp.zeros(context.shape[1:], jnp.float32)
        null_pooled = jnp.zeros(pooled.shape[1:], jnp.float32)
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = (1 - s) * x0 + s * eps
    target = mode.teacher_cfg_velocity(frozen, x_t, sigma, context, pooled, null_context, null_pooled, guidance,
                                       compute=compute, embedded_guidance=teacher_guidance)
    pred = student_fn(params, x_t, sigma, context, pooled, guidance).astype(jnp.float32)
    per_sample = jnp.mean((pred - target) ** 2, axis=tuple(range(1, x0.ndim)))
    return jnp.mean(loss_weight(sigma, weighting) * per_sample)


def drop_text(key, context, pooled, layout, null_context, null_pooled, encoder_p: float, caption_p: float):
    """Per-sample text dropout. Each encoder's segment (rows x channels of context, its slice of pooled)
    is zeroed with probability encoder_p, independently; then the whole caption is replaced by the
    empty caption's encoding with probability caption_p."""
    b = context.shape[0]
    k_enc, k_cap = jax.random.split(key)
    if encoder_p > 0 and layout:
        keep = jax.random.bernoulli(k_enc, 1 - encoder_p, (len(layout), b))
        ctx_mask = jnp.ones(context.shape, jnp.bool_)
        pool_mask = jnp.ones(pooled.shape, jnp.bool_)
        for i, seg in enumerate(layout):
            k = keep[i][:, None, None]
            region = jnp.zeros(context.shape[1:], jnp.bool_).at[seg.rows, seg.channels].set(True)
            ctx_mask = ctx_mask & ~(region[None] & ~k)
            pregion = jnp.zeros(pooled.shape[1:], jnp.bool_).at[seg.pooled].set(True)
            pool_mask = pool_mask & ~(pregion[None] & ~keep[i][:, None])
        context = jnp.where(ctx_mask, context, 0).astype(context.dtype)
        pooled = jnp.where(pool_mask, pooled, 0).astype(pooled.dtype)
    if caption_p > 0:
        drop = jax.random.bernoulli(k_cap, caption_p, (b,))
        context = jnp.where(drop[:, None, None], null_context[None].astype(context.dtype), context)
        pooled = jnp.where(drop[:, None], null_pooled[None].astype(pooled.dtype), pooled)
    return context, pooled
