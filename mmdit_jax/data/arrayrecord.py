"""Precomputed training examples in ArrayRecord files: one file per latent shape (so a batch drawn from one
file is one shape), a meta.json describing them, and the null-caption encoding beside them.

A record is a msgpack map {key, caption, latents, context, pooled}; each array is stored as
[shape, dtype name, little-endian bytes] (no pickles), float32 or, to halve the files (SD3's context alone
is 5.4 MB per example in float32), bfloat16; reading gives float32. The folder is written under a temporary name and
renamed into place when complete."""
from __future__ import annotations

import glob
import os

import ml_dtypes
import msgpack
import numpy as np

from mmdit_jax.data.encode import TextSegment
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.io.files import AtomicFolder, write_json

FORMAT = "mmdit-jax precomputed latents v1"
META = "meta.json"
NULL_TEXT = "null_text.safetensors"
_ARRAYS = ("latents", "context", "pooled")
_F32 = np.dtype("<f4")
STORE_DTYPES = {"float32": _F32, "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def encode_record(key: str, caption: str, latents, context, pooled, dtype: str = "float32") -> bytes:
    out = {"key": key, "caption": caption}
    for name, arr in zip(_ARRAYS, (latents, context, pooled)):
        arr = np.ascontiguousarray(np.asarray(arr, np.float32).astype(STORE_DTYPES[dtype]))
        out[name] = [list(arr.shape), dtype, arr.tobytes()]
    return msgpack.packb(out, use_bin_type=True)


def decode_record(blob: bytes) -> dict:
    """{key, caption, latents, context, pooled}; raises ValueError on a malformed record."""
    try:
        rec = msgpack.unpackb(blob, raw=False)
        out = {"key": str(rec["key"]), "caption": str(rec["caption"])}
        for name in _ARRAYS:
            shape, dtype, data = rec[name]
            out[name] = np.frombuffer(data, STORE_DTYPES[dtype]).reshape(shape).astype(np.float32)
    except (msgpack.UnpackException, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed record: {type(e).__name__}: {e}") from None
    return out


def bucket_file(latent_shape) -> str:
    return "latents-" + "x".join(str(int(s)) for s in latent_shape) + ".array_record"


class RecordWriter:
    """Collects records per latent shape into `out` (a new folder); `commit` makes it appear complete. Buckets
    are listed in the order first written: readers draw from them in that order."""

    def __init__(self, out: str, overwrite: bool = False, dtype: str = "float32"):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        if dtype not in STORE_DTYPES:
            raise MMDiTError(f"record dtype {dtype!r} unknown; expected one of {', '.join(STORE_DTYPES)}")
        self.dtype = dtype
        self.out = paths.absolute(out)
        if paths.exists(self.out) and not overwrite:
            raise MMDiTError(f"{out}: output already exists (pass --overwrite to replace it)")
        self.folder = AtomicFolder(self.out)
        self.tmp = self.folder.tmp
        self.writers, self.buckets = {}, {}

    def add(self, pixels, key: str, caption: str, latents, context, pooled):
        shape = tuple(int(s) for s in np.shape(latents))
        if shape not in self.writers:
            # group_size 1: every record is readable on its own (random access for shuffling); float data
            # barely compresses (7% for SD3 records) while decompression cut reads 3.6x: store plainly
            self.writers[shape] = self._writer_cls(os.path.join(self.tmp, bucket_file(shape)),
                                                   "group_size:1,uncompressed")
            self.buckets[shape] = {"file": bucket_file(shape), "pixels": [int(p) for p in pixels],
                                   "latents": list(shape), "count": 0}
        self.writers[shape].write(encode_record(key, caption, latents, context, pooled, self.dtype))
        self.buckets[shape]["count"] += 1

    def commit(self, meta: dict, null_text) -> dict:
        """Write meta.json (with the bucket list) and the null-caption encoding, then rename into place;
        returns the metadata written."""
        from mmdit_jax.io.safetensors_io import save_file

        for w in self.writers.values():
            w.close()
        self.writers = {}
        if not self.buckets:
            self.abort()
            raise MMDiTError(f"{self.out}: no example could be encoded, nothing written")
        meta = dict(meta, format=FORMAT, buckets=list(self.buckets.values()))  # in the order written
        save_file({"context": np.asarray(null_text[0], _F32), "pooled": np.asarray(null_text[1], _F32)},
                  os.path.join(self.tmp, NULL_TEXT))
        write_json(os.path.join(self.tmp, META), meta, indent=1)
        self.folder.commit()
        return meta

    def abort(self):
        for w in self.writers.values():
            w.close()
        self.writers = {}
        self.folder.abort()


class RecordSet:
    """A precompute output read back: `buckets` [(pixels, latent shape, file, count)], `text_layout`,
    `null_text` (context (L, D), pooled (P,)), `meta`."""

    def __init__(self, path: str):
        path = paths.absolute(path)
        if paths.isdir(path):
            folder, files = path, None
        elif paths.is_remote(path):
            raise MMDiTError(f"{path}: on a bucket, give the precompute output's folder (no patterns)")
        else:
            files = sorted(glob.glob(path))
            if not files:
                raise MMDiTError(f"{path}: no ArrayRecord file matches")
            folders = {os.path.dirname(os.path.abspath(f)) for f in files}
            if len(folders) != 1:
                raise MMDiTError(f"{path}: files come from several folders; give one precompute output")
            folder = folders.pop()
        meta_path = paths.join(folder, META)
        if not paths.isfile(meta_path):
            raise MMDiTError(f"{meta_path}: not found; ArrayRecord data must be written by mmdit-precompute")
        try:
            self.meta = paths.read_json(meta_path)
            assert self.meta.get("format") == FORMAT, f"format {self.meta.get('format')!r}"
            buckets = [(tuple(b["pixels"]), tuple(b["latents"]), paths.join(folder, b["file"]),
                        int(b["count"])) for b in self.meta["buckets"]]
            self.text_layout = tuple(TextSegment.from_json(s) for s in self.meta["text_layout"])
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise MMDiTError(f"{meta_path}: unreadable precompute metadata ({e})") from None
        if files is not None:
            chosen = {os.path.abspath(f) for f in files}
            unknown = chosen - {os.path.abspath(b[2]) for b in buckets}
            if unknown:
                raise MMDiTError(f"{sorted(unknown)[0]}: not listed in {meta_path}")
            buckets = [b for b in buckets if os.path.abspath(b[2]) in chosen]
        listed = set(paths.listdir(folder)) if paths.is_remote(folder) else None
        for b in buckets:
            if not (os.path.isfile(b[2]) if listed is None else b[2].rsplit("/", 1)[-1] in listed):
                raise MMDiTError(f"{b[2]}: listed in {meta_path} but missing")
        self.buckets = buckets
        from mmdit_jax.io.safetensors_io import TensorFile

        null_path = paths.join(folder, NULL_TEXT)
        if not paths.isfile(null_path):
            raise MMDiTError(f"{null_path}: not found (written by mmdit-precompute)")
        t = TensorFile(null_path)
        self.null_text = (np.asarray(t["context"], np.float32), np.asarray(t["pooled"], np.float32))


def open_source(file: str):
    """A grain random-access source over one ArrayRecord file (raw bytes per record). A bucket's file is
    read from a local copy (ArrayRecord's reader takes local paths only), fetched by each process that
    reads from it."""
    import grain

    return grain.sources.ArrayRecordDataSource([paths.local_file(file)])
