"""FLUX.2's 4-axis rotary position embedding.

Every token has an id (T, H, W, L): text token l is (0, 0, 0, l); the image token at (r, c) of the
patchified grid is (0, r, c, 0), row-major; reference image k's token at (r, c) is (10 + 10 k, r, c, 0).
The sequence is [text; image; reference 0; reference 1; ...]. Each axis owns a slice of the head dim
(axes_dim) and rotates adjacent channel pairs by id * theta^(-2j/d), as FLUX.1 does.

All ids follow from static shapes, so the tables are built at trace time in float64 and rounded once to
float32 (as the references compute them): float32 angles would be off by ~1e-5 rad at text position 500.
"""
from __future__ import annotations

import numpy as np

REFERENCE_TIME_STEP = 10  # reference k sits at time coordinate 10 + 10 k


def grid_ids(h: int, w: int, t: float = 0.0) -> np.ndarray:
    """(h*w, 4) ids of an h x w token grid at time coordinate t, row-major."""
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.stack([np.full(h * w, t), rows.ravel(), cols.ravel(), np.zeros(h * w)], axis=-1)


def text_ids(n: int) -> np.ndarray:
    ids = np.zeros((n, 4))
    ids[:, 3] = np.arange(n)
    return ids


def position_ids(n_text: int, grid: tuple[int, int], references=()) -> np.ndarray:
    """(L, 4) float64 ids of [text; image; references...]; `references` lists (h_k, w_k) grids."""
    parts = [text_ids(n_text), grid_ids(*grid)]
    parts += [grid_ids(h, w, REFERENCE_TIME_STEP * (1 + k)) for k, (h, w) in enumerate(references)]
    return np.concatenate(parts, axis=0)


def rope_tables(ids: np.ndarray, axes_dim, theta: float):
    """(cos, sin), each (L, head_dim/2) float32 numpy, for position ids (L, len(axes_dim))."""
    parts = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        parts.append(ids[:, i:i + 1] * omega[None, :])
    angles = np.concatenate(parts, axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
