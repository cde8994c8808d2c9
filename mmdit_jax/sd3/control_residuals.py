"""Where SD3 ControlNet residuals enter the base MMDiT: which residual follows which joint block."""
from __future__ import annotations

import jax.numpy as jnp

from mmdit_jax.errors import MMDiTError


def stacked(samples, what: str):
    """K residuals (B, N, D) as one (K, B, N, D) array (a list, tuple or array is accepted)."""
    arr = jnp.stack(list(samples)) if isinstance(samples, (list, tuple)) else jnp.asarray(samples)
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise MMDiTError(f"{what}: need K >= 1 residuals of shape (B, N, D), got shape {arr.shape}")
    return arr


def block_indices(num_layers: int, k: int) -> list[int | None]:
    """The residual each joint block receives, None for the last (context pre-only) block: diffusers adds
    residual int(i / (num_layers / K)) after block i, and none after a pre-only block."""
    interval = num_layers / k
    return [int(i / interval) if i < num_layers - 1 else None for i in range(num_layers)]


def residual_after(cfg, samples, x_shape):
    """A function (block kind, block indices) -> `Stack`'s `after` argument for that group (None when the
    group receives nothing), adding the residuals to the image stream x."""
    if samples is None:
        return lambda kind, idx: None
    samples = stacked(samples, "controlnet_block_samples")
    if samples.shape[1:] != tuple(x_shape):
        raise MMDiTError(f"controlnet_block_samples of shape {samples.shape}: each residual must match the "
                         f"image tokens (B, N, D) = {tuple(x_shape)}")
    which = block_indices(cfg.num_layers, samples.shape[0])

    def after(kind, idx):
        if which[idx[0]] is None:
            return None

        def add(carry, j):
            ctx, x = carry
            return (ctx, x + samples[j].astype(x.dtype)), None
        return add, jnp.asarray([which[i] for i in idx], jnp.int32)

    return after
