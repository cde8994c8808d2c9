"""The whole denoising loop as one pure function (lax.scan over the precomputed steps), guidance included.

`make_denoise(apply, progress)` returns a jitted
    denoise(params, x, cond, uncond, guidance, steps, scales, *, solver, cfg, slg_layers, show_progress)
compiled once per (shapes, number of steps, static settings); sigmas, guidance and scales are traced
values, so changing them does not recompile.

- apply(params, latents, sigma, context, pooled, guidance, skip_layers) -> velocity.
- cond / uncond: (context, pooled) pairs; uncond is used only when `cfg` is set.
- guidance: (B,) embedded guidance (FLUX.1-dev) or None.
- steps: dict of (N,) arrays: "sigma_in" (network input), "sigma" (solver), "slg" (bool), and the
  solver's coefficient table (solvers.step_table).
- scales: {"cfg": scalar, "slg": scalar}.
The carry stays float32 whatever the network dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdit_jax.sampling import guidance as G
from mmdit_jax.sampling import solvers


def make_denoise(apply, progress=None):
    def denoise(params, x, cond, uncond, guidance, steps, scales, *, solver: str, cfg: bool,
                slg_layers: tuple = (), show_progress: bool = False):
        b = x.shape[0]
        ctx, pooled = cond
        if cfg:
            ctx2 = jnp.concatenate([uncond[0], ctx], axis=0)
            pooled2 = jnp.concatenate([uncond[1], pooled], axis=0)
            guidance2 = None if guidance is None else jnp.concatenate([guidance, guidance], axis=0)

        def velocity(x, sigma_in, slg_on):
            if not cfg:
                return apply(params, x, jnp.full((b,), sigma_in), ctx, pooled, guidance, ())
            v2 = apply(params, jnp.concatenate([x, x], axis=0), jnp.full((2 * b,), sigma_in), ctx2, pooled2,
                       guidance2, ()).astype(jnp.float32)
            v_uncond, v_cond = v2[:b], v2[b:]
            v = G.cfg(v_uncond, v_cond, scales["cfg"])
            if slg_layers:
                # inactive steps reuse v_cond, so the correction is exactly zero and costs nothing
                v_skip = jax.lax.cond(
                    slg_on,
                    lambda: apply(params, x, jnp.full((b,), sigma_in), ctx, pooled, guidance,
                                  slg_layers).astype(jnp.float32),
                    lambda: v_cond)
                v = G.skip_layer(v, v_cond, v_skip, scales["slg"])
            return v

        def body(carry, step):
            x, prev = carry
            v = velocity(x, step["sigma_in"], step["slg"]).astype(jnp.float32)
            x, prev = solvers.update(solver, x, v, step["sigma"], prev, step)
            if show_progress and progress is not None:
                jax.debug.callback(progress.tick, step["index"])
            return (x, prev), None

        steps = dict(steps, index=jnp.arange(steps["sigma"].shape[0]))
        x = x.astype(jnp.float32)
        (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), steps)
        return x

    return jax.jit(denoise, static_argnames=("solver", "cfg", "slg_layers", "show_progress"))
