"""Float8 checkpoints read as full-precision weights (dequantised on load).

A float8 tensor alone is read as its values (the safetensors reader maps F8_E4M3 / F8_E5M2 to
ml_dtypes, which cast exactly to wider floats). Scaled float8 files store `w / scale` and the scale beside
it, under one of the names in circulation: `<layer>.weight_scale` (ComfyUI's and BFL's scaled float8),
`<layer>.scale_weight` (older ComfyUI "scaled_fp8"). Those weights are multiplied back by their scale
(a scalar or one per output row). Activation scales (`input_scale`, `scale_input`) and marker tensors
(`comfy_quant`, `scaled_fp8`) describe quantised matmuls, not weights, and are dropped.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from mmdit_jax.errors import MMDiTError

WEIGHT_SCALES = ("weight_scale", "scale_weight")
DROPPED = ("input_scale", "scale_input", "comfy_quant")
MARKERS = ("scaled_fp8",)


def _shape(tensors, k):
    return tuple(tensors.shape(k)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[k]))


class Dequantized(Mapping):
    """`base` without its scale keys; weights that had a scale come out multiplied by it, in float32."""

    def __init__(self, base: Mapping, origin: str):
        self.base, self.origin = base, origin
        self.scales: dict[str, str] = {}
        hidden = set()
        for k in base:
            layer, _, leaf = k.rpartition(".")
            if leaf in WEIGHT_SCALES:
                weight = f"{layer}.weight" if layer else "weight"
                if weight not in base:
                    raise MMDiTError(f"{origin}: scale {k!r} has no weight {weight!r} beside it")
                self.scales[weight] = k
                hidden.add(k)
            elif leaf in DROPPED or k in MARKERS:
                hidden.add(k)
        for weight, scale in self.scales.items():
            s, w = _shape(base, scale), _shape(base, weight)
            if int(np.prod(s)) not in (1, w[0]):
                raise MMDiTError(f"{origin}: scale {scale!r} of shape {s} fits neither the whole of "
                                 f"{weight!r} {w} nor its rows")
        self._keys = [k for k in base if k not in hidden]
        self._keyset = set(self._keys)

    def shape(self, k):
        return _shape(self.base, k)

    def __getitem__(self, k):
        if k not in self.scales:
            return self.base[k]
        w = np.asarray(self.base[k]).astype(np.float32)
        s = np.asarray(self.base[self.scales[k]]).astype(np.float32)
        return w * (s.reshape(()) if s.size == 1 else s.reshape((-1,) + (1,) * (w.ndim - 1)))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, k):
        return k in self._keyset


def dequantized(tensors: Mapping, origin: str) -> Mapping:
    """`tensors` itself when it holds no scale or marker keys, else a `Dequantized` view of it."""
    if not any(k.rpartition(".")[2] in WEIGHT_SCALES + DROPPED or k in MARKERS for k in tensors):
        return tensors
    return Dequantized(tensors, origin)
