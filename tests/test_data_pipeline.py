"""The on-the-fly data pipeline over an image-caption folder, with a tiny SD3 pipeline as encoders: batches
equal the public encoders' outputs, one shape per batch, determinism, per-process shards, exact resume,
unreadable images skipped and counted, and the toy kind against the documented toy interface."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import mmdit_jax as mj
from conftest import max_rel_err
from data_tiny import StandInToy, add_broken, image_folder, save, sd3_pipeline
from mmdit_jax.data import DataConfig, make_train_data
from mmdit_jax.data.buckets import fit
from mmdit_jax.errors import MMDiTError
from mmdit_jax.toy import train_hooks as pipeline_module

# buckets at resolution 32, step 16: (64, 16), (32, 32), (16, 64); the last four need a resize
SIZES = [(32, 32)] * 6 + [(64, 16)] * 4 + [(16, 64)] * 4 + [(40, 36), (36, 40), (100, 30), (30, 100)]
N_SEQ = 8


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    return save(sd3_pipeline(str(tmp)), str(tmp / "pipe"))


@pytest.fixture(scope="module")
def ref(sd3):
    """The public encoders, loaded once (each load compiles afresh)."""
    return mj.load_vae(sd3), mj.load_text_encoders(sd3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("images"))
    captions = image_folder(root, SIZES)
    broken = add_broken(root)
    return root, captions, broken


def _cfg(root, **kw):
    return DataConfig(kind="folder", path=root, resolution=32, bucket_step=16, max_sequence_length=N_SEQ, **kw)


def _take(data, n):
    out = []
    for _ in range(n):
        batch = next(data)
        out.append((list(data.last_keys), batch))
    return out


def _same(a, b):
    assert [k for k, _ in a] == [k for k, _ in b]
    for (_, x), (_, y) in zip(a, b):
        for name in ("latents", "context", "pooled"):
            np.testing.assert_array_equal(x[name], y[name])


def test_batches_equal_the_public_encoders(sd3, folder, ref):
    root, captions, _ = folder
    data = make_train_data(_cfg(root), batch_size=2, seed=0, encoders_path=sd3)
    vae, enc = ref
    ctx0, pooled0 = enc([""], max_sequence_length=N_SEQ)
    np.testing.assert_array_equal(data.null_text[0], np.asarray(ctx0)[0])
    np.testing.assert_array_equal(data.null_text[1], np.asarray(pooled0)[0])
    for keys, batch in _take(data, 8):
        images = [Image.open(os.path.join(root, k)).convert("RGB") for k in keys]
        h, w = batch["latents"].shape[1] * 2, batch["latents"].shape[2] * 2
        pixels = np.stack([fit(im, (h, w)) for im in images]).astype(np.float32) / 127.5 - 1
        ctx, pooled = enc([captions[k] for k in keys], max_sequence_length=N_SEQ)
        assert batch["latents"].dtype == batch["context"].dtype == batch["pooled"].dtype == np.float32
        assert batch["context"].shape == (2, 12 + N_SEQ, 64) and batch["pooled"].shape == (2, 20 + 28)
        assert max_rel_err(batch["latents"], vae.encode(pixels)) < 1e-6
        assert max_rel_err(batch["context"], ctx) < 1e-6 and max_rel_err(batch["pooled"], pooled) < 1e-6
        # images already at their bucket's size went in untouched
        for im, k in zip(images, keys):
            if im.size == (w, h):
                np.testing.assert_array_equal(fit(im, (h, w)), np.asarray(im))


def test_each_batch_is_one_bucket_shape(sd3, folder):
    root, _, _ = folder
    data = make_train_data(_cfg(root), batch_size=2, seed=3, encoders_path=sd3)
    assert data.shapes == [(64, 16), (32, 32), (16, 64)]
    assert data.latent_shapes == [(32, 8, 16), (16, 16, 16), (8, 32, 16)]
    seen = set()
    for keys, batch in _take(data, 14):
        shape = batch["latents"].shape[1:]
        assert shape in data.latent_shapes and batch["latents"].shape[0] == 2
        seen.add(shape)
        for k in keys:  # every image in its nearest-aspect bucket
            w, h = Image.open(os.path.join(root, k)).size
            want = (32, 32) if 0.5 < h / w < 2 else (64, 16) if h > w else (16, 64)
            assert (shape[0] * 2, shape[1] * 2) == want, (k, shape)
    assert len(seen) == 3


def test_same_seed_same_batches_other_seed_other_order(sd3, folder):
    root, _, _ = folder
    make = lambda seed: make_train_data(_cfg(root), batch_size=2, seed=seed, encoders_path=sd3)  # noqa: E731
    a, b, c = _take(make(7), 6), _take(make(7), 6), _take(make(8), 6)
    _same(a, b)
    assert [k for k, _ in a] != [k for k, _ in c]


def test_process_shards_are_disjoint_and_cover_the_folder(sd3, folder):
    root, _, (_, truncated) = folder
    readable = sorted(k for k in os.listdir(root) if k.endswith(".png") and k != "broken.png")
    for count in (2, 3):
        union = []
        for i in range(count):
            # one bucket, batch 1: the first len(shard) examples of a process are one epoch of its shard
            data = make_train_data(_cfg(root, buckets=False), batch_size=1, seed=1, encoders_path=sd3,
                                   process_index=i, process_count=count)
            shard = [k for k in readable[i::count] if k != truncated]
            keys = [k for keys, _ in _take(data, len(shard)) for k in keys]
            assert sorted(keys) == sorted(shard)
            union += keys
        assert sorted(union) == sorted(set(union)) == [k for k in readable if k != truncated]


def test_processes_agree_on_every_batch_shape(sd3, folder):
    root, _, _ = folder
    runs = [_take(make_train_data(_cfg(root), batch_size=2, seed=4, encoders_path=sd3, process_index=i,
                                  process_count=2), 10) for i in range(2)]
    for (ka, a), (kb, b) in zip(*runs):
        assert a["latents"].shape == b["latents"].shape
        assert not set(ka) & set(kb)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_exactly_the_following_batches(sd3, folder, workers):
    root, _, _ = folder
    cfg = _cfg(root, num_workers=workers, random_flip=True, random_crop=True)
    make = lambda: make_train_data(cfg, batch_size=2, seed=5, encoders_path=sd3)  # noqa: E731
    first = make()
    fresh_state = json.loads(json.dumps(first.get_state()))
    _take(first, 9)
    state = json.loads(json.dumps(first.get_state()))
    stats = first.stats()
    after = _take(first, 6)
    resumed = make()
    resumed.set_state(state)
    assert resumed.stats() == stats
    _same(after, _take(resumed, 6))
    restarted = make()
    _take(restarted, 2)
    restarted.set_state(fresh_state)  # back to the start
    _same(_take(make(), 3), _take(restarted, 3))


def test_unreadable_images_are_skipped_and_counted(sd3, folder):
    root, _, (broken, truncated) = folder
    data = make_train_data(_cfg(root, buckets=False), batch_size=2, seed=0, encoders_path=sd3)
    assert data.stats()["skipped_at_scan"] == 1 and broken in data.skipped
    keys = [k for keys, _ in _take(data, 12) for k in keys]  # more than an epoch
    assert broken not in keys and truncated not in keys
    stats = data.stats()
    assert stats["skipped"] == 2 and stats["skipped_at_load"] == 1 and stats["skip_events"] >= 1
    assert "truncated" in data.skipped[truncated]
    assert set(keys) == {k for k in os.listdir(root) if k.endswith(".png")} - {broken, truncated}


def test_missing_captions_are_empty(sd3, tmp_path):
    root = str(tmp_path / "nocap")
    image_folder(root, [(32, 32)] * 3, seed=5, captions=False)
    data = make_train_data(_cfg(root), batch_size=2, seed=0, encoders_path=sd3)
    batch = next(data)
    assert data.stats()["uncaptioned"] == 3
    for i in range(2):
        np.testing.assert_allclose(batch["context"][i], data.null_text[0], rtol=0, atol=1e-6)


def test_bad_setups_are_one_line_errors(sd3, folder, tmp_path):
    root, _, _ = folder
    with pytest.raises(MMDiTError, match="bucket_step 6 must be a multiple of 4"):
        make_train_data(DataConfig(kind="folder", path=root, resolution=32, bucket_step=6), batch_size=1,
                        seed=0, encoders_path=sd3)
    with pytest.raises(MMDiTError, match="needs a path"):
        make_train_data(DataConfig(kind="folder"), batch_size=1, seed=0, encoders_path=sd3)
    with pytest.raises(MMDiTError, match="unknown"):
        DataConfig(kind="webdataset")
    with pytest.raises(MMDiTError, match="not found"):
        make_train_data(_cfg(str(tmp_path / "nowhere")), batch_size=1, seed=0, encoders_path=sd3)
    with pytest.raises(MMDiTError, match="encoders_path"):
        make_train_data(_cfg(root), batch_size=1, seed=0, encoders_path=None)
    with pytest.raises(MMDiTError, match="process_index"):
        make_train_data(_cfg(root), batch_size=1, seed=0, encoders_path=sd3, process_index=2, process_count=2)
    data = make_train_data(_cfg(root), batch_size=2, seed=0, encoders_path=sd3)
    other = make_train_data(_cfg(root), batch_size=2, seed=1, encoders_path=sd3)
    with pytest.raises(MMDiTError, match="differs in: seed"):
        data.set_state(other.get_state())


def test_toy_kind_encodes_the_toy_source(sd3, ref, monkeypatch):
    monkeypatch.setattr(pipeline_module, "toy_source", lambda resolution, seed: StandInToy(resolution, seed, 30))
    cfg = DataConfig(kind="toy", resolution=32, max_sequence_length=N_SEQ)
    vae, enc = ref
    toy = StandInToy(32, 11, 30)
    for i in range(2):
        data = make_train_data(cfg, batch_size=2, seed=11, encoders_path=sd3, process_index=i, process_count=2)
        for keys, batch in _take(data, 3):
            assert all(int(k) % 2 == i for k in keys)
            examples = [toy[int(k)] for k in keys]
            pixels = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1
            ctx, pooled = enc([e["caption"] for e in examples], max_sequence_length=N_SEQ)
            assert max_rel_err(batch["latents"], vae.encode(pixels)) < 1e-6
            assert max_rel_err(batch["context"], ctx) < 1e-6 and max_rel_err(batch["pooled"], pooled) < 1e-6
        assert data.stats()["examples"] == 15  # a finite source reports its count (this process's half)


def test_toy_kind_reports_its_endless_source_as_such(sd3):
    # the real toy source is 2**31 - 1 indices long, each a distinct drawn example: no count to print
    cfg = DataConfig(kind="toy", resolution=32, max_sequence_length=N_SEQ)
    data = make_train_data(cfg, batch_size=2, seed=11, encoders_path=sd3)
    assert data.stats()["examples"] == "endless (drawn per index)"
