"""Aspect-ratio buckets, the nearest-bucket rule, merging of small buckets, and resize + crop to a bucket."""
import math

import numpy as np
import pytest
from PIL import Image

from mmdit_jax.data.buckets import fit, make_buckets, merge_small, nearest_bucket
from mmdit_jax.errors import MMDiTError


@pytest.mark.parametrize("resolution,step", [(256, 64), (1024, 64), (512, 32), (32, 16), (300, 48)])
def test_buckets_are_near_the_pixel_target_with_sides_multiple_of_step(resolution, step):
    target = resolution ** 2
    shapes = make_buckets(resolution, step)
    assert len(shapes) == len(set(shapes)) >= 1
    for h, w in shapes:
        assert h % step == 0 and w % step == 0
        assert h * w <= target
        # maximal: neither side can grow by a step without passing the target
        assert (h + step) * w > target and h * (w + step) > target
        assert max(h, w) <= 4 * min(h, w)
        assert (w, h) in shapes  # portrait and landscape alike
    if resolution % step == 0:
        assert (resolution, resolution) in shapes
    aspects = [h / w for h, w in shapes]
    assert aspects == sorted(aspects, reverse=True)


def test_sdxl_like_bucket_list():
    shapes = make_buckets(1024, 64)
    assert shapes[:3] == [(2048, 512), (1792, 576), (1600, 640)] and (1024, 1024) in shapes
    assert all(h * w >= 0.9 * 1024 ** 2 for h, w in shapes)


def test_resolution_below_step_is_an_error():
    with pytest.raises(MMDiTError, match="bucket_step"):
        make_buckets(32, 64)


def test_nearest_bucket_by_log_aspect():
    shapes = make_buckets(256, 64)  # (512,128) (320,192) (256,256) (192,320) (128,512)
    assert shapes[nearest_bucket(1000, 250, shapes)] == (512, 128)
    assert shapes[nearest_bucket(250, 1000, shapes)] == (128, 512)
    assert shapes[nearest_bucket(333, 333, shapes)] == (256, 256)
    assert shapes[nearest_bucket(480, 300, shapes)] == (320, 192)
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(10, 2000, 2)
        i = nearest_bucket(h, w, shapes)
        d = [abs(math.log(h / w) - math.log(a / b)) for a, b in shapes]
        assert d[i] == min(d)


def test_small_buckets_merge_into_the_nearest_aspect():
    shapes = [(512, 128), (320, 192), (256, 256), (192, 320), (128, 512)]
    assign = [0] * 1 + [1] * 5 + [2] * 9 + [3] * 2 + [4] * 6
    out = merge_small(assign, shapes, 4)
    counts = {b: out.count(b) for b in set(out)}
    assert all(c >= 4 for c in counts.values())
    assert out[:1] == [1]  # the tallest image joins the next tallest bucket
    assert out[15:17] == [2, 2]  # (192, 320) is nearer to the square than to (128, 512)
    assert sorted(counts) == [1, 2, 4]
    assert merge_small([0, 1, 1], shapes, 10) == [1, 1, 1]  # down to one bucket at most
    assert merge_small(assign, shapes, 1) == assign


def test_fit_identity_resize_and_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit(img, (48, 32)), img)
    np.testing.assert_array_equal(fit(Image.fromarray(img), (48, 32)), img)
    # 48x32 into 16x16: scale 0.5 -> 24x16, centre crop rows 4..20
    want = np.asarray(Image.fromarray(img).resize((16, 24), Image.BICUBIC))[4:20]
    np.testing.assert_array_equal(fit(img, (16, 16)), want)
    # wide bucket from a tall image: scale up to cover 32 wide -> 48x32, centre rows 20..28
    np.testing.assert_array_equal(fit(img, (8, 32)), img[20:28])


def test_fit_random_crop_and_flip_are_seeded():
    img = np.random.default_rng(1).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    crops = {fit(img, (40, 40), np.random.default_rng(s), random_crop=True).tobytes() for s in range(12)}
    windows = {img[:, x:x + 40].tobytes() for x in range(25)}
    assert len(crops) > 3 and crops <= windows
    a = fit(img, (40, 40), np.random.default_rng(5), random_crop=True, flip=True)
    b = fit(img, (40, 40), np.random.default_rng(5), random_crop=True, flip=True)
    np.testing.assert_array_equal(a, b)
    flips = [fit(img, (40, 64), np.random.default_rng(s), flip=True) for s in range(20)]
    n = sum(np.array_equal(f, img[:, ::-1]) for f in flips)
    assert 0 < n < 20 and all(np.array_equal(f, img) or np.array_equal(f, img[:, ::-1]) for f in flips)
