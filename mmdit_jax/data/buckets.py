"""Aspect-ratio buckets: shapes of about resolution**2 pixels with sides multiples of a step, the nearest
bucket for an image, small buckets merged away, and the resize + crop of an image to its bucket.

Shapes are (height, width) throughout, as the NHWC arrays are."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mmdit_jax.errors import MMDiTError

MAX_ASPECT = 4.0  # longer side / shorter side


def make_buckets(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Every (h, w), multiples of `step`, with h * w <= resolution**2 and neither side growable by a step
    without passing it, aspect at most `max_aspect`; sorted from tall to wide."""
    target = resolution * resolution
    if target < step * step:
        raise MMDiTError(f"data resolution {resolution} is below bucket_step {step}: no bucket fits")

    def most(other):  # the largest multiple of step whose product with `other` stays within the target
        return (target // other) // step * step

    out = []
    for h in range(step, target // step + 1, step):
        w = most(h)
        if w >= step and most(w) == h and max(h, w) <= max_aspect * min(h, w):
            out.append((h, w))
    return sorted(set(out), key=lambda s: s[0] / s[1], reverse=True)


def nearest_bucket(height: int, width: int, shapes: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket nearest in log aspect ratio (ties: the earlier one)."""
    a = math.log(height / width)
    return min(range(len(shapes)), key=lambda i: abs(a - math.log(shapes[i][0] / shapes[i][1])))


def merge_small(assignment: list[int], shapes: Sequence[tuple[int, int]], minimum: int) -> list[int]:
    """Reassign the images of buckets holding fewer than `minimum` to the nearest-aspect bucket that stays,
    smallest first, until every used bucket holds `minimum` or only one is left. Deterministic."""
    assignment = list(assignment)
    while True:
        counts = {b: assignment.count(b) for b in set(assignment)}
        if len(counts) <= 1:
            return assignment
        small = min(counts, key=lambda b: (counts[b], b))
        if counts[small] >= minimum:
            return assignment
        rest = sorted(b for b in counts if b != small)
        h, w = shapes[small]
        target = rest[nearest_bucket(h, w, [shapes[b] for b in rest])]
        assignment = [target if b == small else b for b in assignment]


def fit(image, shape: tuple[int, int], rng: np.random.Generator | None = None, *, random_crop: bool = False,
        flip: bool = False) -> np.ndarray:
    """Resize `image` (PIL image or uint8 HxWx3 array) to just cover `shape`, keeping its aspect, then
    crop to `shape` (centre, or a random offset with `random_crop`) and mirror it half of the time with
    `flip`. Returns uint8 (h, w, 3)."""
    bh, bw = shape
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
        pil = None
    else:
        w, h = image.size
        pil = image
    scale = max(bh / h, bw / w)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if (nh, nw) != (h, w):
        pil = pil if pil is not None else Image.fromarray(image)
        # Pillow's bicubic widens its kernel when shrinking, so downscaling is antialiased
        pil = pil.resize((nw, nh), Image.BICUBIC)
    arr = np.asarray(pil if pil is not None else image, np.uint8)
    if random_crop and rng is not None:
        top, left = int(rng.integers(0, nh - bh + 1)), int(rng.integers(0, nw - bw + 1))
    else:
        top, left = (nh - bh) // 2, (nw - bw) // 2
    arr = arr[top:top + bh, left:left + bw]
    if flip and rng is not None and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)
