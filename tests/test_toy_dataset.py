"""The toy dataset: deterministic by (seed, index), captions agree with images (checked by the toy
checker), held-out (colour, shape, position) triples never produced for training."""
import itertools

import numpy as np
import pytest

from mmdit_jax.errors import MMDiTError
from mmdit_jax.toy import checker, dataset
from mmdit_jax.toy.dataset import HELD_OUT, TRAIN_TRIPLES, Spec, ToyShapes


def test_deterministic_by_seed_and_index():
    a, b = ToyShapes(seed=3), ToyShapes(seed=3)
    for i in (0, 1, 17, 123456, len(a) - 1):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and np.array_equal(x["image"], y["image"])
        assert x["image"].dtype == np.uint8 and x["image"].shape == (32, 32, 3)
    # reading in another order gives the same examples (no hidden state)
    assert np.array_equal(ToyShapes(seed=3)[17]["image"], a[17]["image"])
    other = ToyShapes(seed=4)
    assert any(not np.array_equal(other[i]["image"], a[i]["image"]) for i in range(5))
    # neighbouring indices differ
    assert len({a[i]["caption"] for i in range(20)}) > 10
    with pytest.raises(IndexError):
        a[len(a)]


def test_grain_source():
    import grain

    ds = ToyShapes(seed=1)
    src = grain.MapDataset.source(ds)
    assert src[5]["caption"] == ds[5]["caption"] and np.array_equal(src[5]["image"], ds[5]["image"])
    batch = src.batch(4)[0]
    assert batch["image"].shape == (4, 32, 32, 3) and len(batch["caption"]) == 4


@pytest.mark.parametrize("resolution,n", [(32, 300), (64, 120)])
def test_captions_match_images(resolution, n):
    """The checker reads back every attribute the caption names from the ground-truth image."""
    ds = ToyShapes(resolution, seed=7)
    results = []
    for i in range(n):
        spec, item = ds.spec(i), ds[i]
        assert item["caption"] == spec.caption
        results.append(checker.score(item["image"], spec))
    scores = checker.aggregate(results)
    assert min(scores.values()) >= 0.99, scores


def test_held_out_triples_never_in_training():
    everything = set(itertools.product(dataset.COLOURS, dataset.SHAPES, dataset.POSITION_NAMES))
    assert set(TRAIN_TRIPLES) | HELD_OUT == everything and not set(TRAIN_TRIPLES) & HELD_OUT
    assert len(HELD_OUT) == len(dataset.COLOURS) * len(dataset.SHAPES)  # one per (colour, shape)
    # every attribute value is still trained and still evaluated: only combinations are new
    for axis, values in enumerate((dataset.COLOURS, dataset.SHAPES, dataset.POSITION_NAMES)):
        assert {t[axis] for t in HELD_OUT} == set(values)
        assert {t[axis] for t in TRAIN_TRIPLES} == set(values)
    ds = ToyShapes(seed=0)
    seen = {ds.spec(i).triple for i in range(5000)}
    assert not seen & HELD_OUT
    assert len(seen) == len(TRAIN_TRIPLES)  # and the training triples are all reached
    specs = dataset.held_out_specs()
    assert {s.triple for s in specs} == HELD_OUT and len(specs) == 2 * len(HELD_OUT)


def test_vocabulary_and_spec_validation():
    words = set(dataset.vocabulary())
    assert all(set(c.split()) <= words for c in dataset.all_captions())
    assert Spec("red", "circle", "left", "large").caption == "a large red circle on the left"
    with pytest.raises(MMDiTError, match="colour"):
        Spec("pink", "circle", "left")
    with pytest.raises(MMDiTError, match="multiple of 8"):
        ToyShapes(resolution=30)
