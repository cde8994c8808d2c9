"""Toy evaluation: scores ground-truth samplers at 100% and wrong ones at 0, writes the grid, the scores
and a loss-curve PNG."""
import json

import numpy as np
import pytest
from PIL import Image

from mmdit_jax.errors import MMDiTError
from mmdit_jax.toy import dataset
from mmdit_jax.toy.dataset import Spec, render
from mmdit_jax.toy.evaluate import evaluate, plot_loss_curve

BY_CAPTION = {Spec(c, s, p, z).caption: Spec(c, s, p, z) for c in dataset.COLOURS for s in dataset.SHAPES
              for p in dataset.POSITION_NAMES for z in dataset.SIZES}


def truth(prompts, seed):
    return np.stack([render(BY_CAPTION[p], 32, np.random.default_rng([seed, i])) for i, p in enumerate(prompts)])


def test_ground_truth_scores_full_marks(tmp_path):
    scores = evaluate(truth, None, str(tmp_path), seeds=(0, 1))
    assert scores == {k: 1.0 for k in ("colour", "shape", "position", "size", "object", "overall")}
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] > 8 * 32 and len(np.unique(np.asarray(grid).reshape(-1, 3), axis=0)) > 10
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["scores"] == scores and saved["images"] == 2 * len(dataset.held_out_specs())
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_wrong_samples_score_zero_and_floats_are_accepted():
    colours = list(dataset.COLOURS)

    def wrong_colour(prompts, seed):
        out = []
        for p in prompts:
            s = BY_CAPTION[p]
            s = Spec(colours[(colours.index(s.colour) + 1) % len(colours)], s.shape, s.position, s.size)
            out.append(render(s, 32, None))
        return np.stack(out).astype(np.float32) / 255.0  # float images in [0, 1]

    specs = dataset.held_out_specs()[:12]
    scores = evaluate(wrong_colour, specs, None, verbose=False)
    assert scores["colour"] == 0.0 and scores["overall"] == 0.0
    assert scores["position"] == 1.0 and scores["shape"] == 1.0
    blank = evaluate(lambda p, s: np.zeros((len(p), 32, 32, 3), np.uint8), specs, None, verbose=False)
    assert all(v == 0.0 for v in blank.values())
    with pytest.raises(MMDiTError, match="sample_fn must return"):
        evaluate(lambda p, s: np.zeros((len(p), 32, 32), np.uint8), specs, None)
    with pytest.raises(MMDiTError, match="Specs"):
        evaluate(truth, [], None)


def test_loss_curve(tmp_path):
    steps = np.arange(0, 500, 5)
    plot_loss_curve(steps, 1.5 * np.exp(-steps / 100) + 0.2, str(tmp_path / "loss.png"))
    img = np.asarray(Image.open(tmp_path / "loss.png"))
    assert img.shape == (400, 640, 3)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    rows = np.nonzero(blue.any(axis=1))[0]
    cols = np.nonzero(blue.any(axis=0))[0]
    # the curve spans the plot and falls: its left end is higher (smaller row) than its right end
    assert cols.max() - cols.min() > 400 and rows.max() - rows.min() > 200
    assert np.nonzero(blue[:, cols.min()])[0].mean() < np.nonzero(blue[:, cols.max()])[0].mean()
    plot_loss_curve([3], [0.5], str(tmp_path / "one.png"))  # a single point still draws
    with pytest.raises(MMDiTError, match="equal-length"):
        plot_loss_curve([1, 2], [0.5], str(tmp_path / "bad.png"))
