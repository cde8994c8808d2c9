"""The toy checker rejects wrong images: another colour, shape or position, blank, noise, clutter."""
import numpy as np
import pytest

from mmdit_jax.toy import checker, dataset
from mmdit_jax.toy.dataset import Spec, render


def _others(values, v):
    return [x for x in values if x != v]


@pytest.mark.parametrize("resolution", [32, 64])
def test_wrong_attribute_is_rejected(resolution):
    rng = np.random.default_rng(0)
    for i in range(40):
        spec = dataset.sample_spec(rng, tuple(dataset.TRAIN_TRIPLES) + tuple(dataset.HELD_OUT))
        img = render(spec, resolution, np.random.default_rng(i))
        assert checker.score(img, spec)["overall"]
        for attr, values in (("colour", dataset.COLOURS), ("shape", dataset.SHAPES),
                             ("position", dataset.POSITION_NAMES), ("size", dataset.SIZES)):
            wrong = Spec(**{**spec.__dict__, attr: _others(list(values), getattr(spec, attr))[i % (len(values) - 1)]})
            # the image drawn for the wrong spec fails the original, and vice versa
            r = checker.score(render(wrong, resolution, np.random.default_rng(i)), spec)
            assert not r[attr], (attr, spec, wrong)
            assert not checker.score(img, wrong)[attr]
            if attr != "size":
                assert not r["overall"]


def test_blank_noise_and_clutter_are_rejected():
    spec = Spec("red", "circle", "center", "large")
    rng = np.random.default_rng(1)
    blank = np.full((32, 32, 3), 30, np.uint8)
    noise = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    smooth_noise = np.clip(np.kron(rng.normal(128, 60, (8, 8, 3)), np.ones((4, 4, 1))), 0, 255).astype(np.uint8)
    full = np.zeros((32, 32, 3), np.uint8)
    full[1:-1, 1:-1] = dataset.COLOURS["red"]  # a "red object" filling the frame is not an object
    two = render(spec, 32, None)
    other = render(Spec("blue", "square", "top left", "small"), 32, None)
    two = np.where(np.abs(other.astype(int) - two.astype(int)).max(-1, keepdims=True) > 0,
                   np.maximum(two, other), two).astype(np.uint8)
    for name, img in (("blank", blank), ("noise", noise), ("smooth noise", smooth_noise), ("full", full),
                      ("two objects", two)):
        r = checker.score(img, spec)
        assert not r["object"] and not r["overall"] and not r["colour"], name
    assert checker.detect(two).objects == 2


def test_speck_noise_is_tolerated_and_scores_aggregate():
    spec = Spec("green", "triangle", "bottom right", "large")
    img = render(spec, 32, np.random.default_rng(3)).copy()
    img[0, 15] = 255  # a single stray pixel is below the minimum object area
    assert checker.score(img, spec)["overall"]
    agg = checker.aggregate([{"a": True, "b": False}, {"a": True, "b": True}])
    assert agg == {"a": 1.0, "b": 0.5}
    with pytest.raises(ValueError):
        checker.aggregate([])
