"""Evaluation of a text-to-image model on the toy world: sample held-out prompts, score, draw.

`evaluate(sample_fn, specs, out_dir)` calls `sample_fn(prompts, seed)` (a list of captions -> images,
uint8 (N, H, W, 3) or float in [0, 1]) once per seed, scores every image with the toy checker and writes
`grid.png` (each image enlarged, its caption below, and a green / red letter per attribute: C colour,
S shape, P position) and `scores.json`. `plot_loss_curve` draws a loss curve PNG with Pillow only.
Files are written aside and renamed into place.
"""
from __future__ import annotations

import math
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.io.files import write_json
from mmdit_jax.sampling.images import save_png
from mmdit_jax.toy import checker
from mmdit_jax.toy.dataset import Spec, held_out_specs

SCORE_KEYS = ("colour", "shape", "position", "size", "object", "overall")
GREEN, RED = (40, 180, 70), (220, 50, 50)


def _as_uint8(images, n: int) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[0] != n or x.shape[-1] != 3:
        raise MMDiTError(f"sample_fn must return ({n}, H, W, 3) images, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return x


def draw_grid(images, specs, results, path, columns: int = 8, scale: int = 4):
    """A labelled grid PNG: image, caption (two lines) and per-attribute marks."""
    font = ImageFont.load_default()
    h, w = images.shape[1:3]
    cw, ch = w * scale + 8, h * scale + 40
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (im, sp, r) in enumerate(zip(images, specs, results)):
        x0, y0 = (i % columns) * cw + 4, (i // columns) * ch + 2
        canvas.paste(Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST), (x0, y0))
        ty = y0 + h * scale + 2
        draw.text((x0, ty), f"{sp.size} {sp.colour} {sp.shape}", fill=(0, 0, 0), font=font)
        draw.text((x0, ty + 12), sp.position, fill=(0, 0, 0), font=font)
        for j, (letter, key) in enumerate((("C", "colour"), ("S", "shape"), ("P", "position"))):
            draw.text((x0 + w * scale - 30 + 10 * j, ty + 12), letter, fill=GREEN if r[key] else RED, font=font)
    save_png(canvas, path)


def evaluate(sample_fn, specs=None, out_dir=None, seeds=(0,), verbose: bool = True) -> dict[str, float]:
    """Sample every spec's caption for each seed, score with the checker; returns mean accuracies
    {colour, shape, position, size, object, overall}. Writes grid.png and scores.json to `out_dir`
    (skipped when None)."""
    specs = list(held_out_specs() if specs is None else specs)
    if not specs or not all(isinstance(s, Spec) for s in specs):
        raise MMDiTError("evaluate needs a non-empty list of toy Specs")
    prompts = [s.caption for s in specs]
    t0 = time.time()
    images, all_specs = [], []
    for seed in seeds:
        images.append(_as_uint8(sample_fn(prompts, int(seed)), len(prompts)))
        all_specs += specs
    images = np.concatenate(images)
    results = [checker.score(im, sp) for im, sp in zip(images, all_specs)]
    scores = checker.aggregate(results)
    scores = {k: scores[k] for k in SCORE_KEYS}
    if out_dir is not None:
        paths.makedirs(out_dir)
        draw_grid(images, all_specs, results, paths.join(out_dir, "grid.png"))
        path = paths.join(out_dir, "scores.json")
        write_json(path, {"scores": scores, "images": len(images), "seeds": list(seeds),
                          "per_image": [{"caption": s.caption, "seed": int(seeds[i // len(specs)]), **r}
                                        for i, (s, r) in enumerate(zip(all_specs, results))]}, indent=1)
    if verbose:
        print(f"toy eval: {len(images)} images in {time.time() - t0:.1f}s: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()), flush=True)
    return scores


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    return [t for t in np.arange(math.ceil(lo / step) * step, hi + step / 2, step) if lo <= t <= hi]


def plot_loss_curve(steps, losses, path: str, title: str = "training loss", size=(640, 400)):
    """A line plot of loss against step (log-scale y when the losses span more than a factor 3)."""
    steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
    if steps.shape != losses.shape or steps.ndim != 1 or len(steps) == 0:
        raise MMDiTError(f"plot_loss_curve needs equal-length 1-D steps and losses, got {steps.shape} "
                         f"and {losses.shape}")
    ok = np.isfinite(losses)
    W, H = size
    left, right, top, bottom = 70, 20, 30, 45
    font = ImageFont.load_default()
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    if ok.any():
        s, l = steps[ok], losses[ok]
        log = bool(l.min() > 0 and l.max() / l.min() > 3)
        f = np.log10 if log else (lambda v: v)
        y = f(l)
        x_lo, x_hi = float(s.min()), float(max(s.max(), s.min() + 1))
        y_lo, y_hi = float(y.min()), float(y.max())
        if y_hi - y_lo < 1e-12:
            y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
        px = lambda v: left + (v - x_lo) / (x_hi - x_lo) * (W - left - right)  # noqa: E731
        py = lambda v: H - bottom - (v - y_lo) / (y_hi - y_lo) * (H - top - bottom)  # noqa: E731
        for t in _nice_ticks(x_lo, x_hi):
            d.line([px(t), H - bottom, px(t), H - bottom + 4], fill=(0, 0, 0))
            d.text((px(t) - 10, H - bottom + 6), f"{t:g}", fill=(0, 0, 0), font=font)
        ticks = _nice_ticks(y_lo, y_hi) if not log else \
            [math.log10(v) for v in _nice_ticks(10 ** y_lo, 10 ** y_hi)] or [y_lo, y_hi]
        for t in ticks:
            d.line([left - 4, py(t), left, py(t)], fill=(0, 0, 0))
            d.text((4, py(t) - 6), f"{(10 ** t if log else t):.3g}", fill=(0, 0, 0), font=font)
        pts = [(px(a), py(b)) for a, b in zip(s, y)]
        if len(pts) > 1:
            d.line(pts, fill=(30, 90, 200), width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(30, 90, 200))
        d.text((W // 2 - 10, H - 16), "step" + ("   (log-scale loss)" if log else ""), fill=(0, 0, 0), font=font)
    save_png(img, path)
