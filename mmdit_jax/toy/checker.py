"""An automatic scorer for toy images, in the manner of GenEval's single-object tests.

Detection: the background is the median colour of the image border; foreground pixels differ from it
by more than FG_THRESHOLD (max over channels); 8-connected components of at least MIN_AREA pixels are
objects. An image passes "object" when it shows exactly one object of plausible size (a blank image,
noise or clutter fail). For that object:
- colour: the nearest palette colour (RGB) to the median of its core pixels (far from the background,
  so anti-aliased edges do not pull it toward the background);
- position: the 3x3 grid cell holding its coverage-weighted centroid;
- shape: geometric features of the coverage (fill of the bounding box, share of mass in its top
  half), nearest prototype;
- size: bounding-box extent against the midpoint of the two drawn sizes.
Attributes other than "object" count as wrong when no single object is found.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from mmdit_jax.toy.dataset import COLOURS, POSITION_NAMES, SIZES, Spec

FG_THRESHOLD = 48
CORE_THRESHOLD = 0.75  # core pixels: coverage above this
MIN_AREA = 4  # pixels; smaller specks are ignored as noise
MAX_AREA_FRACTION = 0.4  # an "object" covering more of the image than this is not one of ours
ATTRIBUTES = ("object", "colour", "shape", "position", "size")
# Prototype features (fill, top share): their exact values for the continuous shapes.
SHAPE_PROTOTYPES = {
    "circle": (0.785, 0.5),
    "square": (1.0, 0.5),
    "triangle": (0.5, 0.25),
    "diamond": (0.5, 0.5),
}
SHAPE_SCALES = np.array([0.06, 0.05])  # feature spread at 32 pixels: distances in these units
# Largest half-extent of each shape in units of the drawn size (see dataset._inside).
SHAPE_EXTENT = {"circle": 1.0, "square": 0.886, "triangle": 1.05, "diamond": 1.2}


@dataclasses.dataclass(frozen=True)
class Detection:
    found: bool  # exactly one object of plausible size
    objects: int
    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    features: tuple = ()


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    return np.median(border, axis=0)


def shape_features(cover: np.ndarray) -> tuple[float, float]:
    """(fill of the bounding box, share of mass above its middle). Extents are soft (sums of the
    per-column / per-row peak coverage) so that a shape straddling pixel boundaries is not penalised
    for its partly covered edge rows: fill is 1 for a square, pi/4 for a circle, 1/2 for a triangle or
    a diamond; the top share is 1/2 for the symmetric shapes and 1/4 for an upward triangle."""
    cols, rows = cover.max(axis=0), cover.max(axis=1)
    mass = cover.sum()
    fill = mass / (cols.sum() * rows.sum())
    # the soft middle row: half of the mass-weighted extent from the top of the row profile
    cum = np.cumsum(rows)
    mid = np.interp(cum[-1] / 2, cum, np.arange(1, len(rows) + 1))  # in pixels from the top
    row_mass = cover.sum(axis=1)
    edges = np.arange(len(rows) + 1)
    above = np.clip(mid - edges[:-1], 0, 1)  # fraction of each pixel row above the middle
    return float(fill), float((row_mass * above).sum() / mass)


def detect(image: np.ndarray) -> Detection:
    """The single object in a uint8 (H, W, 3) image, if there is exactly one."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    img = img.astype(np.float64)
    bg = _background(img)
    diff = np.abs(img - bg).max(axis=-1)
    labels, n = ndimage.label(diff > FG_THRESHOLD, structure=np.ones((3, 3)))
    areas = ndimage.sum_labels(np.ones_like(diff), labels, index=np.arange(1, n + 1)) if n else []
    big = [i + 1 for i, a in enumerate(areas) if a >= MIN_AREA]
    if len(big) != 1:
        return Detection(False, len(big))
    mask = labels == big[0]
    h, w = diff.shape
    if mask.sum() > MAX_AREA_FRACTION * h * w:
        return Detection(False, 1)
    # coverage: how far each pixel of the object (grown by one pixel for its soft edge) is from the
    # background, relative to the object's core colour distance
    grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))
    core_dist = np.percentile(diff[mask], 90)
    cover = np.where(grown, np.clip(diff / max(core_dist, 1e-6), 0, 1), 0.0)
    core = mask & (cover > CORE_THRESHOLD)
    median = np.median(img[core if core.any() else mask], axis=0)
    names = list(COLOURS)
    dists = [np.linalg.norm(median - np.array(COLOURS[c])) for c in names]
    colour = names[int(np.argmin(dists))]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = (cover * ys).sum() / cover.sum(), (cover * xs).sum() / cover.sum()
    row, col = min(int(cy * 3 // h), 2), min(int(cx * 3 // w), 2)
    feats = shape_features(cover)
    shape = min(SHAPE_PROTOTYPES, key=lambda s: float(
        np.sum(((np.array(feats) - SHAPE_PROTOTYPES[s]) / SHAPE_SCALES) ** 2)))
    ys_m, xs_m = np.nonzero(cover > 0.5)
    extent = max(ys_m.max() - ys_m.min() + 1, xs_m.max() - xs_m.min() + 1) / (2 * h * SHAPE_EXTENT[shape])
    size = "small" if extent < np.mean(list(SIZES.values())) else "large"
    return Detection(True, 1, colour, shape, POSITION_NAMES[3 * row + col], size, feats)


def score(image: np.ndarray, spec: Spec) -> dict[str, bool]:
    """Per-attribute correctness of `image` for the intended `spec`; "overall" = object, colour,
    shape and position all correct (size is reported, not part of overall)."""
    d = detect(image)
    out = {"object": d.found}
    for a in ("colour", "shape", "position", "size"):
        out[a] = bool(d.found and getattr(d, a) == getattr(spec, a))
    out["overall"] = all(out[a] for a in ("object", "colour", "shape", "position"))
    return out


def aggregate(results: list[dict[str, bool]]) -> dict[str, float]:
    """Mean accuracy per attribute over scored images."""
    if not results:
        raise ValueError("no results to aggregate")
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}
