"""T5 v1.1 encoder (the T5-XXL text tower of SD3 and FLUX.1) in Flax NNX.

Pre-norm layers: RMS norm (no mean subtraction, no bias, eps 1e-6) -> self-attention without the
1/sqrt(d) scale plus a relative position bias -> RMS norm -> gated-GELU(tanh) feed-forward; a final RMS
norm. The bias table lives in block 0 and is reused by every layer.

Half precision: T5-XXL's residual stream grows to large magnitudes and its feed-forward output is the
least precise part (transformers keeps `wo` in float32 for this reason). Here the residual stream and
all norms are float32 in every mode, and `wo` keeps float32 weights when the model is loaded in
bfloat16; only the other matmuls run in bfloat16.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.attention import attention
from mmdit_jax.layers import Linear, merge_heads, ones, param, split_heads
from mmdit_jax.stacking import Stack

embed_init = nnx.initializers.normal(1.0)


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    layers: int = 24
    heads: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


class T5Norm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32; returns the parameter dtype (matmul input)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(ones, rngs.params(), (dim,), param_dtype, ("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...]
        # transformers casts the normalised state to the weight dtype before scaling: do the same
        return xf.astype(w.dtype) * w


def relative_buckets(L: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(L, L) bucket ids of key position minus query position, bidirectional (encoder).

    Half the buckets per direction; within a direction, distances below a quarter of all buckets
    get exact buckets, larger ones are binned logarithmically up to `max_distance`. Static per L, so
    it is computed in numpy at trace time."""
    rel = np.arange(L)[None, :] - np.arange(L)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    exact = half // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        # float32 like the reference, so bin edges fall on the same side
        large = exact + (np.log(dist.astype(np.float32) / exact) / math.log(max_distance / exact)
                         * (half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return out + np.where(dist < exact, dist, large)


class T5Layer(nnx.Module):
    def __init__(self, cfg: T5Config, *, param_dtype, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.heads * cfg.d_kv
        self.heads = cfg.heads
        kw = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.ln_attn = T5Norm(d, cfg.eps, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d, inner, axes=("embed", "qkv"), **kw)
        self.k = Linear(d, inner, axes=("embed", "qkv"), **kw)
        self.v = Linear(d, inner, axes=("embed", "qkv"), **kw)
        self.o = Linear(inner, d, axes=("qkv", "embed"), **kw)
        self.ln_ff = T5Norm(d, cfg.eps, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = Linear(d, cfg.d_ff, axes=("embed", "mlp"), **kw)
        self.wi_1 = Linear(d, cfg.d_ff, axes=("embed", "mlp"), **kw)
        self.wo = Linear(cfg.d_ff, d, axes=("mlp", "embed"), use_bias=False, param_dtype=jnp.float32,
                         rngs=rngs)

    def __call__(self, x, bias):
        h = self.ln_attn(x)
        q, k, v = (split_heads(f(h), self.heads) for f in (self.q, self.k, self.v))
        # no 1/sqrt(d) scale: T5 folds it into the initialisation of q. cuDNN needs the bias in q's
        # dtype; the cast is exact, the table's values come from `rel_bias`, stored in that dtype
        out = attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0)
        x = x + self.o(merge_heads(out)).astype(jnp.float32)
        h = self.ln_ff(x)
        g = jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h)
        return x + self.wo(g).astype(jnp.float32)


class T5Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = param(embed_init, rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype,
                            ("vocab", "embed"))
        self.rel_bias = param(nnx.initializers.normal(1.0), rngs.params(), (cfg.num_buckets, cfg.heads),
                              param_dtype, ("pos", "heads"))
        self.layers = Stack(lambda r: T5Layer(cfg, param_dtype=param_dtype, rngs=r), cfg.layers, rngs=rngs)
        self.final_ln = T5Norm(cfg.d_model, cfg.eps, param_dtype=param_dtype, rngs=rngs)

    def position_bias(self, L: int):
        """(1, H, L, L) float32 attention bias shared by all layers."""
        buckets = relative_buckets(L, self.cfg.num_buckets, self.cfg.max_distance)
        table = self.rel_bias[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def __call__(self, ids):
        """ids (B, L) int -> last hidden state (B, L, d_model) float32 (no attention mask: the
        diffusers pipelines feed padded ids without one)."""
        x = self.shared[...][ids].astype(jnp.float32)
        x = self.layers(x, self.position_bias(ids.shape[1]))
        return self.final_ln(x).astype(jnp.float32)
