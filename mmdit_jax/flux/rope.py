"""FLUX's 3-axis rotary position embedding.

Every token has an id (index, row, col): text tokens are all zeros, the image token at (r, c) of the
packed grid is (0, r, c), row-major, and the sequence is [text; image]. Each axis owns a slice of the
head dim (axes_dim) and rotates ADJACENT channel pairs (x[2k], x[2k+1]) by pos * theta^(-2k/d).
Angles and the rotation are computed in float32 whatever the activation dtype, as the references do:
bf16 angles would be off by whole radians at positions ~100.
"""
from __future__ import annotations

import jax.numpy as jnp


def position_ids(n_text: int, h: int, w: int):
    """(n_text + h*w, 3) float32 ids for a [text; image] sequence over an h x w token grid."""
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
    img = jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).reshape(h * w, 3)
    return jnp.concatenate([jnp.zeros((n_text, 3), jnp.float32), img], axis=0)


def rope_angles(ids, axes_dim, theta: float = 10000.0):
    """(L, head_dim/2) rotation angles: per axis i, ids[:, i] * theta^(-2k/axes_dim[i])."""
    parts = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        parts.append(ids[:, i:i + 1].astype(jnp.float32) * omega[None, :])
    return jnp.concatenate(parts, axis=-1)


def rope_tables(n_text: int, h: int, w: int, axes_dim, theta: float = 10000.0):
    """(cos, sin), each (L, head_dim/2) float32, for a [text; image] sequence."""
    angles = rope_angles(position_ids(n_text, h, w), axes_dim, theta)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (2k, 2k+1) of x (B, L, H, D) by the angles behind (cos, sin) (L, D/2)."""
    b, l, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1)
    return out.reshape(b, l, h, d).astype(x.dtype)
