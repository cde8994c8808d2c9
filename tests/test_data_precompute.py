"""Precompute: a folder encoded once into ArrayRecord files by the tiny FLUX-dev pipeline's encoders, read
back by the data pipeline: the same batches as on-the-fly encoding; unreadable images skipped and listed;
atomic output; the command line."""
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from conftest import max_rel_err
from data_tiny import add_broken, flux_pipeline, image_folder, save
from mmdit_jax.data import DataConfig, make_train_data
from mmdit_jax.data import arrayrecord
from mmdit_jax.data.precompute import precompute
from mmdit_jax.errors import MMDiTError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(32, 32)] * 5 + [(64, 16)] * 3 + [(16, 64)] * 4 + [(40, 36), (100, 30)]
N_SEQ = 6
GEOMETRY = dict(resolution=32, bucket_step=16)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    return save(flux_pipeline(str(tmp)), str(tmp / "pipe"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, flux):
    root = str(tmp_path_factory.mktemp("clean"))
    image_folder(root, SIZES, seed=3)
    out = str(tmp_path_factory.mktemp("records") / "latents")
    precompute(root, flux, out, batch_size=3, max_sequence_length=N_SEQ, **GEOMETRY)
    return root, out


def _take(data, n):
    out = []
    for _ in range(n):
        batch = next(data)
        out.append((list(data.last_keys), batch))
    return out


def test_records_read_back_as_the_on_the_fly_batches(flux, clean):
    root, out = clean
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert [b["count"] for b in meta["buckets"]] == [4, 6, 4] and meta["family"] == "flux"
    assert [b["pixels"] for b in meta["buckets"]] == [[64, 16], [32, 32], [16, 64]]
    for count in (1, 2):
        for i in range(count):
            kw = dict(batch_size=2, seed=9, process_index=i, process_count=count)
            pre = make_train_data(DataConfig(kind="arrayrecord", path=out), encoders_path=None, **kw)
            fly = make_train_data(DataConfig(kind="folder", path=root, max_sequence_length=N_SEQ, **GEOMETRY),
                                  encoders_path=flux, **kw)
            assert pre.latent_shapes == fly.latent_shapes and pre.text_layout == fly.text_layout
            np.testing.assert_array_equal(pre.null_text[0], fly.null_text[0])
            np.testing.assert_array_equal(pre.null_text[1], fly.null_text[1])
            for (ka, a), (kb, b) in zip(_take(pre, 8), _take(fly, 8)):
                assert ka == kb
                for name in ("latents", "context", "pooled"):
                    assert a[name].shape == b[name].shape and a[name].dtype == np.float32
                    # encoded in batches of 3 there and 2 here: equal up to XLA's batch-dependent rounding
                    assert max_rel_err(a[name], b[name]) < 1e-6, name


def test_record_iterator_resumes_exactly(clean):
    _, out = clean
    make = lambda: make_train_data(DataConfig(kind="arrayrecord", path=out, num_workers=2),  # noqa: E731
                                   batch_size=3, seed=2, encoders_path=None)
    a = make()
    _take(a, 5)
    state = json.loads(json.dumps(a.get_state()))
    want = _take(a, 5)
    b = make()
    b.set_state(state)
    for (ka, x), (kb, y) in zip(want, _take(b, 5)):
        assert ka == kb
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])


def test_one_file_of_a_precompute_is_one_shape(clean):
    _, out = clean
    data = make_train_data(DataConfig(kind="arrayrecord", path=os.path.join(out, "latents-16x16x16.array_record")),
                           batch_size=2, seed=0, encoders_path=None)
    assert data.latent_shapes == [(16, 16, 16)]
    assert all(b["latents"].shape == (2, 16, 16, 16) for _, b in _take(data, 4))


def test_unreadable_images_are_skipped_and_output_is_atomic(flux, tmp_path, monkeypatch):
    root = str(tmp_path / "src")
    image_folder(root, [(32, 32)] * 3, seed=4)
    broken, truncated = add_broken(root)
    out = str(tmp_path / "out")
    meta = precompute(root, flux, out, batch_size=2, max_sequence_length=N_SEQ, **GEOMETRY)
    assert sorted(meta["skipped"]) == [broken, truncated]
    assert [b["count"] for b in meta["buckets"]] == [3]
    data = make_train_data(DataConfig(kind="arrayrecord", path=out), batch_size=1, seed=0, encoders_path=None)
    assert data.stats()["skipped"] == 2
    assert sorted(k for keys, _ in _take(data, 3) for k in keys) == ["000.png", "001.png", "002.png"]

    with pytest.raises(MMDiTError, match="already exists"):
        precompute(root, flux, out, max_sequence_length=N_SEQ, **GEOMETRY)

    def fail(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(arrayrecord.RecordWriter, "commit", fail)
    with pytest.raises(RuntimeError):
        precompute(root, flux, str(tmp_path / "never"), max_sequence_length=N_SEQ, **GEOMETRY)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # nothing half-written left behind


def test_records_refuse_a_mismatched_config(clean):
    _, out = clean
    with pytest.raises(MMDiTError, match="max_sequence_length"):
        make_train_data(DataConfig(kind="arrayrecord", path=out, max_sequence_length=N_SEQ + 1), batch_size=1,
                        seed=0, encoders_path=None)
    with pytest.raises(MMDiTError, match="random_flip"):
        make_train_data(DataConfig(kind="arrayrecord", path=out, random_flip=True), batch_size=1, seed=0,
                        encoders_path=None)
    with pytest.raises(MMDiTError, match="meta.json"):
        make_train_data(DataConfig(kind="arrayrecord", path=os.path.dirname(out)), batch_size=1, seed=0,
                        encoders_path=None)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train", "precompute.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_command_reports_bad_input_in_one_line(tmp_path):
    res = _cli(f"--src={tmp_path / 'missing'}", f"--encoders={tmp_path}", f"--out={tmp_path / 'o'}")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = _cli("--src=x", "--out=y")
    assert res.returncode != 0 and "--encoders is required" in res.stderr


@pytest.mark.slow
def test_command_writes_records_with_progress(flux, clean, tmp_path):
    root, ref = clean
    out = str(tmp_path / "cli")
    res = _cli(f"--src={root}", f"--encoders={flux}", f"--out={out}", "--resolution=32", "--bucket_step=16",
               f"--max_sequence_length={N_SEQ}", "--batch_size=3", "--store_dtype=bfloat16")
    assert res.returncode == 0, res.stderr
    assert "precompute: 14/14 images" in res.stderr and "ETA" in res.stderr
    record = lambda d: arrayrecord.open_source(os.path.join(d, "latents-16x16x16.array_record"))[0]  # noqa
    assert len(record(out)) < 0.55 * len(record(ref))
    a = make_train_data(DataConfig(kind="arrayrecord", path=out), batch_size=2, seed=1, encoders_path=None)
    b = make_train_data(DataConfig(kind="arrayrecord", path=ref), batch_size=2, seed=1, encoders_path=None)
    for (ka, x), (kb, y) in zip(_take(a, 4), _take(b, 4)):
        assert ka == kb
        for n in x:  # bfloat16 storage: the float32 encoding rounded to 8 bits of mantissa
            assert x[n].dtype == np.float32
            assert max_rel_err(x[n], y[n].astype(ml_dtypes.bfloat16).astype(np.float32)) < 1e-6


def test_records_round_trip_and_malformed_ones_are_refused():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((4, 6, 16), (5, 8), (7,))]
    rec = arrayrecord.decode_record(arrayrecord.encode_record("k.png", "a cat", *arrays))
    assert rec["key"] == "k.png" and rec["caption"] == "a cat"
    for name, arr in zip(("latents", "context", "pooled"), arrays):
        np.testing.assert_array_equal(rec[name], arr)
    blob = arrayrecord.encode_record("k.png", "a cat", *arrays, dtype="bfloat16")
    for bad in (b"garbage", blob[:len(blob) // 2], blob.replace(b"bfloat16", b"float64_")):
        with pytest.raises(ValueError, match="malformed record"):
            arrayrecord.decode_record(bad)
