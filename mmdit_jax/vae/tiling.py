"""Tiled encode/decode with linearly blended seams, the scheme of diffusers' `enable_tiling`.

The input is cut into `tile`-sized squares every `int(tile * (1 - overlap))` pixels (edge tiles are
smaller); each tile goes through the network on its own, so device memory depends on the tile, not the
image. Output tiles are blended into their upper and left neighbours over `int(out_tile * overlap)`
rows/columns with a linear ramp, in raster order, each blend reading the neighbour's already blended
values, then cropped to `out_tile - blend` and concatenated. This reproduces AutoencoderKL's
tiled_encode/tiled_decode (including its in-place update order), so results can be compared with it.

Only the per-tile network runs on device (jitted, so one compile per distinct tile shape: at most four,
full, right edge, bottom edge, corner); blending happens on the host in float32 numpy.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mmdit_jax.errors import MMDiTError


def _ramp(n: int, shape_len: int, axis: int) -> np.ndarray:
    # weights y/n of the lower tile; computed in float64 and rounded once, as torch does with scalars
    w = (np.arange(n, dtype=np.float64) / n)
    shape = [1] * shape_len
    shape[axis] = n
    return w.reshape(shape)


def _blend(prev: np.ndarray, cur: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """Ramp from `prev`'s last `extent` slices into `cur`'s first ones along `axis` (1: rows, 2: cols)."""
    e = min(prev.shape[axis], cur.shape[axis], extent)
    if e <= 0:
        return cur
    out = cur.copy()
    w = _ramp(e, cur.ndim, axis)
    head = [slice(None)] * cur.ndim
    tail = [slice(None)] * cur.ndim
    head[axis], tail[axis] = slice(0, e), slice(prev.shape[axis] - e, None)
    a, b = prev[tuple(tail)], cur[tuple(head)]
    out[tuple(head)] = (a * (1 - w).astype(np.float32) + b * w.astype(np.float32)).astype(cur.dtype)
    return out


def tile_geometry(tile_in: int, tile_out: int, overlap: float) -> tuple[int, int, int]:
    """(input stride, output blend extent, output rows kept per tile), as diffusers computes them."""
    if not 0.0 <= overlap < 1.0:
        raise MMDiTError(f"tile overlap {overlap} must be in [0, 1)")
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    if stride < 1 or tile_out - blend < 1:
        raise MMDiTError(f"tile size {tile_in} is too small for overlap {overlap}")
    return stride, blend, tile_out - blend


def run_tiled(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile_in: int, tile_out: int,
              overlap: float) -> np.ndarray:
    """Apply `fn` (a tile (B, h, w, C) -> (B, h*r, w*r, C'), r = tile_out / tile_in) tile by tile."""
    stride, blend, keep = tile_geometry(tile_in, tile_out, overlap)
    h, w = x.shape[1], x.shape[2]
    rows, above = [], None
    for i in range(0, h, stride):
        row, blended = [], []
        for jx, j in enumerate(range(0, w, stride)):
            t = np.asarray(fn(x[:, i:i + tile_in, j:j + tile_in]), np.float32)
            if above is not None:
                t = _blend(above[jx], t, blend, axis=1)
            if blended:
                t = _blend(blended[-1], t, blend, axis=2)
            blended.append(t)
            row.append(t[:, :keep, :keep])
        rows.append(np.concatenate(row, axis=2))
        above = blended
    return np.concatenate(rows, axis=1)
