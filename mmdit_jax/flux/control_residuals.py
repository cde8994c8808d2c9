"""Where FLUX ControlNet residuals enter the base transformer: which residual follows which block."""
from __future__ import annotations

import math

import jax.numpy as jnp

from mmdit_jax.errors import MMDiTError
from mmdit_jax.sd3.control_residuals import stacked


def block_indices(n_blocks: int, k: int, repeat: bool = False) -> list[int]:
    """The residual each of `n_blocks` blocks receives from K: diffusers adds residual i // ceil(n / K)
    after block i, or i % K with `controlnet_blocks_repeat` (XLabs nets, double blocks only)."""
    interval = int(math.ceil(n_blocks / k))
    return [i % k if repeat else i // interval for i in range(n_blocks)]


def residuals_after(cfg, double, single, repeat: bool, img_shape, n_txt: int):
    """`Stack`'s `after` arguments (double blocks, single blocks), None where no residuals are given.
    Single blocks carry [text; image]: the residual goes to the image tokens only."""
    out = []
    for name, samples, n, rep in (("controlnet_block_samples", double, cfg.depth, repeat),
                                  ("controlnet_single_block_samples", single, cfg.depth_single, False)):
        if samples is None or not n:
            out.append(None)
            continue
        samples = stacked(samples, name)
        if samples.shape[1:] != tuple(img_shape):
            raise MMDiTError(f"{name} of shape {samples.shape}: each residual must match the image tokens "
                             f"(B, N, D) = {tuple(img_shape)}")
        index = jnp.asarray(block_indices(n, samples.shape[0], rep), jnp.int32)
        out.append((_adder(samples, name == "controlnet_block_samples", n_txt), index))
    return tuple(out)


def _adder(samples, double: bool, n_txt: int):
    if double:
        def add(carry, j):
            txt, img = carry
            return (txt, img + samples[j].astype(img.dtype)), None
    else:
        def add(x, j):
            return x.at[:, n_txt:].add(samples[j].astype(x.dtype)), None
    return add
