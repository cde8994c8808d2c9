"""The matmul of a Linear whose kernel is quantised (see the package docstring for the two modes)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.quant.formats import FORMATS


def quantized_dot(x, q, scale, n_in: int, dot: str = "dequant"):
    """x (..., *din) times the kernel q (*din, *dout) * scale (*dout); the result in scale's dtype."""
    if dot == "native":
        return _native(x, q, scale, n_in)
    dt = scale.dtype
    return jnp.tensordot(x.astype(dt), q.astype(dt), axes=n_in) * scale


def _contract(n_x: int, n_in: int):
    return ((tuple(range(n_x - n_in, n_x)), tuple(range(n_in))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native(x, q, scale, n_in):
    """Activations quantised per token to q's format, then the int8 / fp8 dot of the hardware."""
    dt = scale.dtype
    fmt = "int8" if q.dtype == jnp.int8 else "fp8"
    qmax = FORMATS[fmt][1]
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=tuple(range(x.ndim - n_in, x.ndim)), keepdims=True)
    xs = jnp.where(amax > 0, amax / qmax, 1.0)
    v = xf / xs
    if fmt == "int8":
        xq, acc = jnp.clip(jnp.round(v), -qmax, qmax).astype(jnp.int8), jnp.int32
    else:
        xq, acc = jnp.clip(v, -qmax, qmax).astype(q.dtype), jnp.float32
    y = jax.lax.dot_general(xq, q, _contract(x.ndim, n_in), preferred_element_type=acc)
    xs = xs.reshape(xs.shape[:x.ndim - n_in] + (1,) * (y.ndim - (x.ndim - n_in)))
    return (y.astype(jnp.float32) * xs * scale.astype(jnp.float32)).astype(dt)


def _native_fwd(x, q, scale, n_in):
    return _native(x, q, scale, n_in), (q, scale, jnp.zeros((0,), x.dtype))  # x's dtype, as an array


def _native_bwd(n_in, res, g):
    """dx through the dequantised kernel (straight-through for the activations' rounding)."""
    q, scale, x_like = res
    dt = scale.dtype
    n_out = q.ndim - n_in
    gs = g.astype(dt) * scale
    out_g = tuple(range(g.ndim - n_out, g.ndim))
    dx = jax.lax.dot_general(gs, q.astype(dt), ((out_g, tuple(range(n_in, q.ndim))), ((), ())))
    dq = (np.zeros(q.shape, jax.dtypes.float0) if jnp.issubdtype(q.dtype, jnp.integer)
          else jnp.zeros_like(q))
    return dx.astype(x_like.dtype), dq, jnp.zeros_like(scale)


_native.defvjp(_native_fwd, _native_bwd)
