"""Building blocks shared by the MMDiT family.

Parameters carry logical axis names (`sharding_names`); `mmdit_jax.sharding` maps them to mesh axes with
one rules table. Layers compute in the dtype of their parameters; statistics of normalisations and the
timestep sinusoid are always computed in float32.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from mmdit_jax.quant.dot import quantized_dot

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def param(init, key, shape, dtype, axes):
    """An nnx.Param annotated with logical axes; placement is decided later by the sharding rules."""
    return nnx.Param(init(key, shape, dtype), sharding_names=tuple(axes), eager_sharding=False)


class Buffer(nnx.Variable):
    """Non-trainable state loaded from checkpoints (e.g. SD3's position table)."""


def _dims(d) -> tuple[int, ...]:
    return (int(d),) if isinstance(d, (int, np.integer)) else tuple(int(x) for x in d)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored (in, out) with logical axes `axes`.

    `din` / `dout` may be tuples: the kernel is then the (prod(din), prod(dout)) matrix reshaped to
    (*din, *dout), and x's last len(din) axes are contracted. Fused projections use this to keep their
    parts on an axis of their own, e.g. qkv as (in, 3, width): sharding `width` over "tensor" splits
    each of q, k and v by heads, where a contiguous split of [q|k|v] would cut across them."""

    def __init__(self, din, dout, *, axes=("embed", "mlp"), use_bias: bool = True,
                 kernel_init=xavier, param_dtype=jnp.float32, rngs: nnx.Rngs):
        din, dout = _dims(din), _dims(dout)
        self.n_in, self.n_out = len(din), len(dout)
        shape = din + dout

        def init(key, _, dtype):  # the same values as the unfused matrix: initialised as one
            return kernel_init(key, (math.prod(din), math.prod(dout)), dtype).reshape(shape)

        self.kernel = param(init, rngs.params(), shape, param_dtype, axes)
        self.bias = param(zeros, rngs.params(), dout, param_dtype, axes[self.n_in:]) if use_bias else None

    # set on block kernels stored as int8 / float8 (mmdit_jax.quant): scales per output channel and the
    # matmul mode; the model's compute dtype is then the scale's
    kernel_scale = None
    dot = "dequant"

    def __call__(self, x):
        k = self.kernel[...]
        if self.kernel_scale is not None:
            y = quantized_dot(x, k, self.kernel_scale[...], self.n_in, self.dot)
        else:
            y = jnp.tensordot(x.astype(k.dtype), k, axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _stats_dtype(x):
    """float32 for half-precision inputs, the input's own dtype if wider."""
    return jnp.promote_types(x.dtype, jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm with a learnable scale; the mean square is taken in float32 (as every reference does)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(ones, rngs.params(), (dim,), param_dtype, ("norm",))

    def __call__(self, x):
        xf = x.astype(_stats_dtype(x))
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return xf.astype(x.dtype) * self.scale[...].astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine parameters, statistics in float32.

    Its derivative is written out (dy = (dx - mean(dx) - y mean(y dx)) / std), so that backward keeps
    only the normalised output and 1/std per token. Autodiff of the formula keeps several full-size
    intermediates per block, and on CPU the scan's stacking of residuals costs about as much memory
    traffic as the arithmetic. A JVP rule rather than a VJP one, so forward-mode AD still works."""
    return _layer_norm(x, eps)[0]


def _layer_norm(x, eps):
    xf = x.astype(_stats_dtype(x))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    return ((xf - mean) * rstd).astype(x.dtype), rstd


@layer_norm.defjvp
def _layer_norm_jvp(eps, primals, tangents):
    y, rstd = _layer_norm(primals[0], eps)
    dx, yf = tangents[0].astype(rstd.dtype), y.astype(rstd.dtype)
    dy = rstd * (dx - dx.mean(-1, keepdims=True) - yf * (yf * dx).mean(-1, keepdims=True))
    return y, dy.astype(tangents[0].dtype)


def modulate(x, shift, scale):
    """AdaLN modulation; shift and scale are (B, D) and broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_tanh(x):
    """GELU, tanh approximation, with its derivative written out: backward keeps one array per call
    (the derivative) instead of the tanh and polynomial intermediates autodiff would store."""
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    x, dx = primals[0], tangents[0]
    xf = x.astype(_stats_dtype(x))
    t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf ** 3))
    d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * xf * xf)
    return jax.nn.gelu(x, approximate=True), (dx.astype(xf.dtype) * d).astype(dx.dtype)


class MLP(nnx.Module):
    """fc1 -> GELU(tanh) -> fc2, hidden width `ratio * dim`."""

    def __init__(self, dim: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        h = gelu_tanh(self.fc1(x))
        h = checkpoint_name(h, "mlp_hidden")
        return self.fc2(h)


class MLPEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear (SD3's t/y embedders, FLUX's time/vector/guidance embedders)."""

    def __init__(self, din: int, dim: int, *, zero_out: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_layer = Linear(din, dim, axes=("cond", "embed"), param_dtype=param_dtype, rngs=rngs)
        self.out_layer = Linear(dim, dim, axes=("embed", "embed_out"), kernel_init=zeros if zero_out else xavier,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class ModulationOut(NamedTuple):
    """One adaLN group: x + gate * f(modulate(LayerNorm(x), shift, scale)); gate is None where the
    group has none (a final layer, SD3's last context stream)."""
    shift: jax.Array
    scale: jax.Array
    gate: jax.Array | None = None


class Modulation(nnx.Module):
    """SiLU -> Linear(dim, n * dim); returns the n chunks of width dim as `ModulationOut` groups of
    (shift, scale, gate) in stored order (n = 2: one (shift, scale) group).

    Zero-initialised so a freshly built block starts as the identity (adaLN-Zero)."""

    def __init__(self, dim: int, n: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.n = n
        self.lin = Linear(dim, n * dim, axes=("embed", "mod"), kernel_init=zeros,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, c):
        return self.split(self.project(c))

    def project(self, c):
        """The n chunks side by side, (B, n * dim): what `Stack` computes for all layers at once."""
        return self.lin(jax.nn.silu(c))

    def split(self, m) -> tuple[ModulationOut, ...]:
        chunks = jnp.split(m, self.n, axis=-1)
        return tuple(ModulationOut(*chunks[i:i + 3]) for i in range(0, self.n, 3))


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear to patch values; zero-initialised output."""

    def __init__(self, dim: int, out: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.mod = Modulation(dim, 2, param_dtype=param_dtype, rngs=rngs)  # (shift, scale) as SAI/BFL
        self.linear = Linear(dim, out, axes=("embed", "out"), kernel_init=zeros, param_dtype=param_dtype,
                             rngs=rngs)

    def __call__(self, x, c):
        (m,) = self.mod(c)
        return self.linear(modulate(layer_norm(x), m.shift, m.scale))


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] with freqs exp(-ln(max_period) * i / (dim/2)), in float32.

    `t` is the already-scaled time (1000 * sigma). Half-precision here would quantise the phase.
    The phase t * freq reaches ~5000 (FLUX guidance), so freq is a correctly rounded float32 constant
    (exp taken in float64): XLA's float32 exp is off by an ulp on some entries, which moves the
    sinusoid by ~1e-4."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def split_heads(x, num_heads: int):
    """(B, L, H*D) -> (B, L, H, D)."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads)


def merge_heads(x):
    b, l, h, d = x.shape
    return x.reshape(b, l, h * d)
