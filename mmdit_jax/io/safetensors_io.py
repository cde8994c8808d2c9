"""Lazy, memory-mapped safetensors reading (no torch, bfloat16 and float8 included).

A `TensorFile` maps names to numpy memmaps of one file; nothing is read until a tensor is used, so a
24 GB checkpoint costs page cache, not resident memory. Headers are checked against the file size, so a
truncated download fails with a message naming the file instead of a bus error later.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from mmdit_jax.io import paths
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.files import AtomicFile

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class TensorFile(Mapping):
    """Read-only mapping name -> np.memmap over one .safetensors file."""

    def __init__(self, path: str):
        self.path = paths.local(str(path))
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise MMDiTError(f"{self.path}: not a safetensors file (shorter than its header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise MMDiTError(f"{self.path}: not a safetensors file (bad header length {n})")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if isinstance(e, FileNotFoundError):
                raise MMDiTError(f"{self.path}: no such file") from None
            raise MMDiTError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                start, end = e["data_offsets"]
                shape = tuple(e["shape"])
            except KeyError as err:
                raise MMDiTError(f"{self.path}: tensor {name!r} has an unsupported or missing "
                                 f"entry {err}") from None
            if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise MMDiTError(f"{self.path}: tensor {name!r} size does not match its shape {shape}")
            if self._base + end > size:
                raise MMDiTError(f"{self.path}: truncated (tensor {name!r} ends at byte "
                                 f"{self._base + end}, file has {size})")
            self._entries[name] = (dtype, shape, start)

    def shape(self, name):
        return self._entries[name][1]

    def __getitem__(self, name) -> np.ndarray:
        dtype, shape, start = self._entries[name]
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._base + start, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


class TensorDict(Mapping):
    """Several TensorFiles (shards) seen as one mapping; keys must not repeat across shards."""

    def __init__(self, paths):
        self.files = [TensorFile(p) for p in paths]
        self._where = {}
        for f in self.files:
            for k in f:
                if k in self._where:
                    raise MMDiTError(f"{f.path}: tensor {k!r} also in {self._where[k].path}")
                self._where[k] = f

    def shape(self, name):
        return self._where[name].shape(name)

    def __getitem__(self, name):
        return self._where[name][name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


class SafetensorsWriter:
    """A .safetensors file whose tensor names, shapes and dtypes are known up front: the header is
    written first, then each tensor at its offset as it comes (any order), so memory holds one tensor.
    The file appears at `path` only on `close()`, once every tensor was written (`path`.partial until
    then)."""

    def __init__(self, path: str, specs, metadata: dict | None = None):
        header, offset = {}, 0
        self.slots = {}
        for name, shape, dtype in specs:
            dtype = np.dtype(dtype)
            if dtype not in _CODES:
                raise MMDiTError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            if name in header:
                raise MMDiTError(f"{path}: tensor {name!r} listed twice")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self.slots[name] = (tuple(int(d) for d in shape), dtype, offset)
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)  # the format allows space padding; keeps tensors 8-aligned
        self.path = path
        self.base, self.size = 8 + len(blob), 8 + len(blob) + offset
        self.pending = set(self.slots)
        self.out = AtomicFile(path, "wb")
        self.f = self.out.f
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)

    def write(self, name: str, arr) -> None:
        shape, dtype, offset = self.slots[name]
        arr = np.asarray(arr)
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise AssertionError(f"{name}: got {arr.shape} {arr.dtype}, header says {shape} {dtype}")
        self.f.seek(self.base + offset)
        self.f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)  # bytes, no copy
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            self.abort()
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        self.f.truncate(self.size)
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None):
    """Write tensors one at a time (no second copy in memory) to `path`, atomically."""
    w = SafetensorsWriter(path, [(k, np.shape(v), np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype)
                                 for k, v in tensors.items()], metadata)
    try:
        for k in tensors:
            w.write(k, tensors[k])
    except BaseException:
        w.abort()
        raise
    w.close()
