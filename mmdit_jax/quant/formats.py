"""Quantisation formats, the spec string users pass (`quantize="int8"`), and the array conversions.

`quantize` / `dequantize` take numpy or jax arrays alike (`xp`): loaders quantise on the host one layer at
a time, in-memory models on device; both give the same bits."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mmdit_jax.errors import MMDiTError

# name -> (storage dtype, largest magnitude a scaled weight takes)
FORMATS = {"int8": (np.dtype(np.int8), 127.0), "fp8": (np.dtype(ml_dtypes.float8_e4m3fn), 448.0)}
DOTS = ("dequant", "native")
# float dtypes a quantised model computes in (the scale's dtype); float64 keeps oracle checks exact
COMPUTE = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    format: str  # "int8" | "fp8"
    dot: str = "dequant"  # "dequant" (convert q inside the dot) | "native" (int8 / fp8 dot)

    @property
    def storage(self) -> np.dtype:
        return FORMATS[self.format][0]

    @property
    def qmax(self) -> float:
        return FORMATS[self.format][1]

    def __str__(self):
        return self.format if self.dot == "dequant" else f"{self.format}:{self.dot}"


def parse_quantize(value, where: str = "quantize") -> QuantSpec | None:
    """None / "" / "none" -> None; "int8", "fp8", "int8:native", "fp8:native" -> QuantSpec."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if not isinstance(value, str):
        raise MMDiTError(f"{where}={value!r}: expected one of {_choices()}")
    if value in ("", "none"):
        return None
    fmt, _, dot = value.partition(":")
    if fmt not in FORMATS or (dot and dot not in DOTS):
        raise MMDiTError(f"{where}={value!r}: expected one of {_choices()}")
    return QuantSpec(fmt, dot or "dequant")


def _choices() -> str:
    return ", ".join([*FORMATS, *(f"{f}:native" for f in FORMATS)])


def check_dtype(spec: QuantSpec, dtype) -> None:
    name = jnp.dtype(dtype).name
    if name not in COMPUTE:
        raise MMDiTError(f"quantize={spec}: the model dtype {name} is not a float dtype a quantised model "
                         f"computes in; use one of {COMPUTE}")


def spec_of_storage(dtype) -> QuantSpec | None:
    """The format whose storage dtype is `dtype` (None for an ordinary float kernel)."""
    for name, (storage, _) in FORMATS.items():
        if np.dtype(dtype) == storage:
            return QuantSpec(name)
    return None


def is_quantized(dtype) -> bool:
    return spec_of_storage(dtype) is not None


def quantize(w, spec: QuantSpec, in_axes: tuple[int, ...], scale_dtype, xp=jnp):
    """(q, scale): q in the format's storage dtype with w's shape; scale in `scale_dtype`, w's shape
    without `in_axes` (the contracted axes), per output channel: w ~= q * scale."""
    wf = xp.asarray(w).astype(np.float32)
    amax = xp.max(xp.abs(wf), axis=in_axes, keepdims=True)
    # times the rounded reciprocal, not divided: XLA turns a division by a constant into that product, and
    # the host path must give the same bits
    scale = xp.where(amax > 0, amax * np.float32(1.0 / spec.qmax), np.float32(1.0)).astype(scale_dtype)
    v = wf / scale.astype(np.float32)
    if spec.format == "int8":
        v = xp.clip(xp.round(v), -spec.qmax, spec.qmax)
    else:
        v = xp.clip(v, -spec.qmax, spec.qmax)
    return v.astype(spec.storage), xp.squeeze(scale, axis=in_axes)


def dequantize(q, scale, in_axes: tuple[int, ...], dtype):
    """q * scale in `dtype` (the kernel as a float array again)."""
    s = jnp.expand_dims(jnp.asarray(scale).astype(dtype), in_axes)
    return jnp.asarray(q).astype(dtype) * s
