"""Finding a component's tensors and config in whatever the user points at.

Accepted: a diffusers pipeline folder (model_index.json + subfolders), a diffusers component folder
(config.json + safetensors, sharded with an index or not), or a single checkpoint file (.safetensors;
.pt/.ckpt/.bin pickles only through torch's weights_only loader).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.io.orbax_io import is_orbax_component
from mmdit_jax.io.safetensors_io import TensorDict, TensorFile

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclasses.dataclass
class Source:
    tensors: Mapping[str, np.ndarray]
    config: dict | None
    origin: str  # what to name in messages
    orbax: bool = False  # params live in Orbax form (see orbax_io); `tensors` is then empty


class PrefixView(Mapping):
    """The keys of `base` that start with `prefix`, with the prefix removed."""

    def __init__(self, base: Mapping, prefix: str):
        self.base, self.prefix = base, prefix
        self._keys = [k[len(prefix):] for k in base if k.startswith(prefix)]

    def shape(self, k):
        k = self.prefix + k
        # a pickle's tensors are a plain dict of arrays
        return self.base.shape(k) if hasattr(self.base, "shape") else np.shape(self.base[k])

    def __getitem__(self, k):
        return self.base[self.prefix + k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise MMDiTError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MMDiTError(f"{path}: not valid JSON ({e})") from None


def open_tensors(path: str) -> Mapping[str, np.ndarray]:
    """Tensors of one checkpoint file, lazily where the format allows."""
    if not os.path.isfile(path):
        raise MMDiTError(f"{path}: no such file")
    if path.endswith(PICKLE_SUFFIXES):
        return _load_pickle(path)
    return TensorFile(path)


def _load_pickle(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise MMDiTError(f"{path}: reading a PyTorch pickle needs torch installed "
                         "(convert it to .safetensors instead)") from None
    try:
        # weights_only: tensors and plain containers only; anything that would run code is refused
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad input file
        raise MMDiTError(f"{path}: refused or unreadable PyTorch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MMDiTError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy())
    return out


def component_tensors(folder: str) -> Mapping[str, np.ndarray]:
    """Tensors of a diffusers component folder (single file or sharded with an index)."""
    names = sorted(os.listdir(folder))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        idx_path = os.path.join(folder, index[0])
        weight_map = read_json(idx_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MMDiTError(f"{idx_path}: no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise MMDiTError(f"{idx_path}: shard files missing: {', '.join(missing)}")
        return TensorDict([os.path.join(folder, s) for s in shards])
    files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            return _load_pickle(os.path.join(folder, pickles[0]))
        raise MMDiTError(f"{folder}: no .safetensors weights in this folder")
    # prefer the full-precision file when variants (fp16) sit beside it
    plain = [n for n in files if n.count(".") == 1] or files
    return TensorDict([os.path.join(folder, n) for n in plain]) if len(plain) > 1 else \
        TensorFile(os.path.join(folder, plain[0]))


def open_component(path: str, subfolder: str) -> Source:
    """A component (e.g. "transformer") from a pipeline folder, a component folder, or a single file."""
    path = paths.local(os.fspath(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            sub = os.path.join(path, subfolder)
            if not os.path.isdir(sub):
                raise MMDiTError(f"{path}: pipeline folder has no {subfolder}/ component")
            path = sub
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise MMDiTError(f"{path}: not a diffusers pipeline or component folder "
                             "(no model_index.json or config.json)")
        if is_orbax_component(path):
            return Source({}, read_json(cfg_path), path, orbax=True)
        return Source(component_tensors(path), read_json(cfg_path), path)
    if os.path.isfile(path):
        return Source(open_tensors(path), None, path)
    raise MMDiTError(f"{path}: no such file or folder")
