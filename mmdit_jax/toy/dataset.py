"""The toy world: procedural images of one coloured shape with a caption, deterministic by index.

Each example is a function of (seed, index) only: colour, shape, position, size, background and small
jitters are drawn from `np.random.default_rng([seed, index])`, the image is rendered with exact
supersampled coverage (anti-aliased, bit-for-bit reproducible), and the caption names every attribute:
"a large red circle on the left".

Positions are the 3x3 grid cells of the image (the object's centre stays well inside its cell and the
whole object inside the image), so a checker scores position from the centroid unambiguously.

Held-out combinations: for colour i and shape j, the position `(2 * i + 5 * j) % 9` (row-major in the
grid) is never produced by the training source; those (colour, shape, position) triples, one per
(colour, shape) pair, are the evaluation prompts (`held_out_specs`). Every colour, shape and position
still appears in training, only the combination is new.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmdit_jax.errors import MMDiTError

COLOURS = {  # RGB; well separated so the nearest palette colour is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# 3x3 grid cells, row-major: (name, caption phrase)
POSITIONS = (("top left", "in the top left"), ("top", "at the top"), ("top right", "in the top right"),
             ("left", "on the left"), ("center", "in the center"), ("right", "on the right"),
             ("bottom left", "in the bottom left"), ("bottom", "at the bottom"),
             ("bottom right", "in the bottom right"))
POSITION_NAMES = tuple(p for p, _ in POSITIONS)
SIZES = {"small": 0.13, "large": 0.21}  # half-extent as a fraction of the image side
BACKGROUNDS = {"dark": (8, 48), "light": (200, 240)}  # grey level range
COLOUR_JITTER = 12  # per-channel uniform jitter of the object colour
CENTRE_JITTER = 0.05  # of the image side, around the cell centre
SUPERSAMPLE = 4  # sub-pixels per side for the coverage (anti-aliasing)
LENGTH = 2 ** 31 - 1  # "endless": any index below this is a distinct example


@dataclasses.dataclass(frozen=True)
class Spec:
    """What an image shows (and its caption says)."""
    colour: str
    shape: str
    position: str
    size: str = "large"

    def __post_init__(self):
        for name, value, known in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                   ("position", self.position, POSITION_NAMES), ("size", self.size, SIZES)):
            if value not in known:
                raise MMDiTError(f"unknown toy {name} {value!r}; known: {', '.join(known)}")

    @property
    def caption(self) -> str:
        phrase = dict(POSITIONS)[self.position]
        return f"a {self.size} {self.colour} {self.shape} {phrase}"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


def held_out_position(colour: str, shape: str) -> str:
    i, j = list(COLOURS).index(colour), SHAPES.index(shape)
    return POSITION_NAMES[(2 * i + 5 * j) % 9]


HELD_OUT = frozenset((c, s, held_out_position(c, s)) for c in COLOURS for s in SHAPES)
TRAIN_TRIPLES = tuple((c, s, p) for c in COLOURS for s in SHAPES for p in POSITION_NAMES
                      if (c, s, p) not in HELD_OUT)


def held_out_specs(sizes=tuple(SIZES)) -> list[Spec]:
    """The evaluation prompts: every held-out (colour, shape, position) triple in each size."""
    return [Spec(c, s, p, z) for c in COLOURS for s in SHAPES for z in sizes
            for p in [held_out_position(c, s)]]


def vocabulary() -> list[str]:
    """Every word a caption can use (for the tokenizers)."""
    words = ["a"] + list(SIZES) + list(COLOURS) + list(SHAPES)
    for _, phrase in POSITIONS:
        words += phrase.split()
    return list(dict.fromkeys(words))


def all_captions() -> list[str]:
    return [Spec(c, s, p, z).caption for c in COLOURS for s in SHAPES for p in POSITION_NAMES for z in SIZES]


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape membership in unit coordinates (u right, v down; extent about [-1, 1]); each shape's
    centroid is at the origin so the drawn centre is the centroid."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.886) & (np.abs(v) <= 0.886)  # area of the unit circle
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.2
    # upward triangle: apex (0, -1.2), base v = 0.6 from u = -1.05 to 1.05 (centroid at v = 0)
    return (v <= 0.6) & (np.abs(u) <= 1.05 * (v + 1.2) / 1.8)


def render(spec: Spec, resolution: int = 32, rng: np.random.Generator | None = None,
           background: str | None = None) -> np.ndarray:
    """(resolution, resolution, 3) uint8. `rng` draws the jitters and background (None: none, the cell
    centre, exact palette colour and a mid-dark background)."""
    r = resolution
    if rng is not None:
        bg_kind = background or ("dark", "light")[rng.integers(2)]
        lo, hi = BACKGROUNDS[bg_kind]
        bg = float(rng.integers(lo, hi + 1))
        colour = np.clip(np.array(COLOURS[spec.colour], np.float64)
                         + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
        jitter = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2) * r
    else:
        lo, hi = BACKGROUNDS[background or "dark"]
        bg, colour, jitter = float((lo + hi) // 2), np.array(COLOURS[spec.colour], np.float64), np.zeros(2)
    row, col = divmod(POSITION_NAMES.index(spec.position), 3)
    half = SIZES[spec.size] * r
    margin = 1.25 * half + 1.0  # every shape fits within 1.25 half-extents of its centre
    cx = np.clip((col + 0.5) * r / 3 + jitter[0], margin, r - margin)
    cy = np.clip((row + 0.5) * r / 3 + jitter[1], margin, r - margin)
    s = SUPERSAMPLE
    sub = (np.arange(r * s) + 0.5) / s  # sub-pixel centres in pixel units
    u = (sub[None, :] - cx) / half
    v = (sub[:, None] - cy) / half
    cover = _inside(spec.shape, u, v).reshape(r, s, r, s).mean(axis=(1, 3))[..., None]
    img = bg * (1.0 - cover) + colour * cover
    return np.rint(img).astype(np.uint8)


def sample_spec(rng: np.random.Generator, triples=TRAIN_TRIPLES) -> Spec:
    c, s, p = triples[rng.integers(len(triples))]
    return Spec(c, s, p, tuple(SIZES)[rng.integers(len(SIZES))])


class ToyShapes:
    """grain RandomAccessDataSource of training examples: `ds[i]` -> {"image": uint8 (R, R, 3),
    "caption": str}; a pure function of (seed, i). Held-out triples never appear."""

    def __init__(self, resolution: int = 32, seed: int = 0, length: int = LENGTH):
        if resolution < 16 or resolution % 8:
            raise MMDiTError(f"toy resolution must be a multiple of 8, at least 16; got {resolution}")
        self.resolution, self.seed, self.length = int(resolution), int(seed), int(length)
        self.endless = self.length == LENGTH  # for the data pipeline's stats: no example count to report

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> Spec:
        return self._draw(index)[0]

    def _draw(self, index: int):
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"toy dataset index {index} out of range [0, {self.length})")
        rng = np.random.default_rng([self.seed, index])
        return sample_spec(rng), rng

    def __getitem__(self, index: int) -> dict:
        spec, rng = self._draw(index)
        return {"image": render(spec, self.resolution, rng), "caption": spec.caption}

    def __repr__(self) -> str:
        return f"ToyShapes(resolution={self.resolution}, seed={self.seed}, length={self.length})"
