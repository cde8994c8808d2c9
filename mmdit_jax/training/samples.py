"""Sample grids during training: fixed prompts, fixed noise, a plain Euler flow sampler.

One small function on purpose: swap `sample_latents` for mj.Pipeline's denoising loop once it exists.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.training.timesteps import apply_shift


def sample_latents(apply_fn, params, noise, context, pooled, null_context, null_pooled, *, steps: int,
                   guidance: float, shift: float, has_guidance: bool):
    """Euler from sigma 1 to 0 on linspace(1, 0, steps+1) shifted by `shift`. Models with a guidance
    embedder (FLUX.1-dev) take `guidance` directly; others use classifier-free guidance with the empty
    caption's encoding."""
    sigmas = apply_shift(jnp.linspace(1.0, 0.0, steps + 1), shift)
    b = noise.shape[0]

    def velocity(x, s):
        sig = jnp.full((b,), s, jnp.float32)
        if has_guidance:
            return apply_fn(params, x, sig, context, pooled, jnp.full((b,), guidance, jnp.float32))
        both = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([sig, sig]),
                        jnp.concatenate([context, jnp.broadcast_to(null_context, context.shape)]),
                        jnp.concatenate([pooled, jnp.broadcast_to(null_pooled, pooled.shape)]), None)
        cond, uncond = both[:b], both[b:]
        return uncond + guidance * (cond - uncond)

    def body(i, x):
        return x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i]).astype(jnp.float32)

    return jax.lax.fori_loop(0, steps, body, noise)


def to_grid(images, columns: int | None = None) -> np.ndarray:
    """(B, H, W, 3) in [-1, 1] -> one uint8 (rows*H, cols*W, 3) image."""
    x = np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    b, h, w, c = x.shape
    cols = columns or int(np.ceil(np.sqrt(b)))
    rows = -(-b // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    return grid
