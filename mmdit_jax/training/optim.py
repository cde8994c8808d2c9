"""Optimizer (optax AdamW with warmup + constant/cosine, global-norm clipping) and the weight EMA.

Gradient accumulation is done in the train step (a scan over microbatches), so one optimizer update is
one training step and the schedule counts updates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate(cfg, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr over warmup_steps, then constant or cosine to lr * min_lr_ratio."""
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else None
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(max_steps - cfg.warmup_steps, 1), cfg.min_lr_ratio)
    if warm is None:
        return after
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg, max_steps: int, trainable) -> optax.GradientTransformation:
    """`trainable`: pytree of bools over params; False leaves (buffers) are never changed."""
    tx = optax.adamw(learning_rate(cfg, max_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_decay(step, cfg):
    """Decay used for the update after optimizer step `step` (0-based)."""
    if not cfg.warmup:
        return jnp.asarray(cfg.decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(cfg.decay, (1 + step) / (10 + step))


def ema_update(ema, params, step, cfg):
    d = ema_decay(step, cfg)
    return jax.tree.map(lambda e, p: (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype), ema, params)
