"""Llama-style decoder language models (Qwen3, Mistral) in Flax NNX, for prompt encoding (FLUX.2).

Computed as transformers' Qwen3Model / MistralModel compute their hidden states: token embedding ->
pre-norm layers [RMSNorm -> grouped-query self-attention (Qwen3: per-head RMSNorm of q and k) with
rotary position embedding (half-split rotation, positions 0..L-1 whatever the padding) -> residual;
RMSNorm -> SiLU-gated MLP -> residual] -> final RMSNorm. `hidden_states[0]` is the embedding,
`hidden_states[i]` layer i's output, and the last one is the final norm's output (transformers replaces
it so).

Masking as transformers' SDPA path does it: causal (and sliding-window, when set) plus the padding
mask on keys; a query row with no valid key at all (a pad before the first token, left padding) gets
a zero attention output, as torch's SDPA gives it.

Everything runs in the parameter dtype with float32 norm statistics and softmax, like the torch
models, so bfloat16 results follow diffusers' bfloat16 encoders.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.attention import attention
from mmdit_jax.layers import Linear, RMSNorm, merge_heads, param
from mmdit_jax.sharding import TOKENS, constrain
from mmdit_jax.stacking import REMAT_POLICIES, Stack

embed_init = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 151936
    hidden: int = 2560
    layers: int = 36
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 9728
    rope_theta: float = 1e6
    eps: float = 1e-6
    qk_norm: bool = True  # Qwen3: RMSNorm over each head's q and k before the rotation
    attention_bias: bool = False
    sliding_window: int | None = None  # keys more than this many positions back are masked
    # False: the first `layers` layers of a deeper model, without its final norm (enough for
    # intermediate hidden states, and the layers after them are never loaded)
    final_norm: bool = True

    def __post_init__(self):
        for f in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DecoderConfig.{f} must be a positive integer, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"DecoderConfig: heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even (rotary halves), got {self.head_dim}")
        if not self.rope_theta > 0 or not self.eps > 0:
            raise ValueError(f"DecoderConfig: rope_theta and eps must be positive, got {self.rope_theta}, "
                             f"{self.eps}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"DecoderConfig.sliding_window must be None or positive, got {self.sliding_window}")


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(L, head_dim) float32 cos and sin for positions 0..L-1, halves repeated ([f, f]).

    Static per length, so computed on the host: inverse frequencies correctly rounded to float32, the
    phases multiplied in float32 (as torch does), cos/sin taken in float64 and rounded once (XLA's float32
    trigonometry on phases of hundreds of radians is a few ulp off)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = (1.0 / (np.float64(theta) ** exponent)).astype(np.float32)
    phase = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    phase = np.concatenate([phase, phase], axis=-1).astype(np.float64)
    return np.cos(phase).astype(np.float32), np.sin(phase).astype(np.float32)


def rotate(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; x (B, L, H, D), tables (L, D)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


def attention_mask(mask, sliding_window: int | None, dtype):
    """(B, 1, L, L) additive bias (0 or the dtype's lowest value) for causal attention over the valid
    keys of `mask` (B, L), and (B, L, 1, 1) which query rows have any valid key at all."""
    length = mask.shape[1]
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= q - k < sliding_window
    keep = jnp.asarray(allowed)[None, None] & (mask[:, None, None, :] > 0)
    bias = jnp.where(keep, 0.0, jnp.finfo(dtype).min).astype(dtype)
    return bias, keep.any(-1)[:, 0, :, None, None]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, hd
        self.sliding_window = cfg.sliding_window
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(d, eps=cfg.eps, **kw)
        self.q = Linear(d, cfg.heads * hd, axes=("embed", "qkv"), use_bias=cfg.attention_bias, **kw)
        self.k = Linear(d, cfg.kv_heads * hd, axes=("embed", "qkv"), use_bias=cfg.attention_bias, **kw)
        self.v = Linear(d, cfg.kv_heads * hd, axes=("embed", "qkv"), use_bias=cfg.attention_bias, **kw)
        self.o = Linear(cfg.heads * hd, d, axes=("qkv", "embed"), use_bias=cfg.attention_bias, **kw)
        self.q_norm = RMSNorm(hd, eps=cfg.eps, **kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=cfg.eps, **kw) if cfg.qk_norm else None
        self.post_norm = RMSNorm(d, eps=cfg.eps, **kw)
        self.gate = Linear(d, cfg.ffn, axes=("embed", "mlp"), use_bias=False, **kw)
        self.up = Linear(d, cfg.ffn, axes=("embed", "mlp"), use_bias=False, **kw)
        self.down = Linear(cfg.ffn, d, axes=("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x, cos, sin, bias, has_key):
        x = constrain(x, TOKENS)
        b, length, _ = x.shape
        h = self.input_norm(x)
        q = self.q(h).reshape(b, length, self.heads, self.head_dim)
        k = self.k(h).reshape(b, length, self.kv_heads, self.head_dim)
        v = self.v(h).reshape(b, length, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # grouped-query attention: kv head j serves query heads j*g .. j*g + g-1
        groups = self.heads // self.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = attention(q, k, v, bias=bias)
        out = checkpoint_name(jnp.where(has_key, out, jnp.zeros((), out.dtype)), "attn_out")
        x = x + self.o(merge_heads(out)).astype(x.dtype)
        h = self.post_norm(x)
        h = checkpoint_name(jax.nn.silu(self.gate(h)) * self.up(h), "mlp_hidden")
        return x + self.down(h).astype(x.dtype)


class DecoderLM(nnx.Module):
    """The decoder stack of a causal LM (no LM head): what prompt encoders read hidden states from."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(embed_init, rngs.params(), (cfg.vocab_size, cfg.hidden), param_dtype,
                           ("vocab", "embed"))
        self.layers = Stack(lambda r: DecoderLayer(cfg, param_dtype=param_dtype, rngs=r), cfg.layers,
                            rngs=rngs)
        self.norm = RMSNorm(cfg.hidden, eps=cfg.eps, param_dtype=param_dtype, rngs=rngs) if cfg.final_norm else None

    def check_layers(self, select) -> tuple[int, ...]:
        """`select` as non-negative hidden-state indices, checked against this model."""
        n = self.cfg.layers  # without the final norm, index n is layer n's output before it
        out = []
        for i in select:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not -(n + 1) <= i <= n:
                raise ValueError(f"hidden-state index {i!r} out of range for {n} layers (0 .. {n})")
            out.append(int(i) % (n + 1))
        return tuple(out)

    def __call__(self, ids, mask=None, select=None, remat: str = "none"):
        """ids (B, L) int, mask (B, L) 1 = token, 0 = padding (None: all tokens) -> the hidden states
        at indices `select` (default: all, 0 .. layers), stacked: (len(select), B, L, hidden)."""
        cfg = self.cfg
        select = self.check_layers(range(cfg.layers + 1) if select is None else select)
        b, length = ids.shape
        mask = jnp.ones((b, length), jnp.int32) if mask is None else mask
        x = self.embed[...][ids]
        cos, sin = (jnp.asarray(t) for t in rope_tables(length, cfg.head_dim, cfg.rope_theta))
        bias, has_key = attention_mask(mask, cfg.sliding_window, x.dtype)
        # which selected slot (if any) keeps each layer's output: (layers, len(select)) one-hot
        keep = jnp.asarray(np.array([[s == i + 1 for s in select] for i in range(cfg.layers)], bool))
        graphdef, state = nnx.split(self.layers.blocks)

        def body(carry, xs):
            h, kept = carry
            layer_state, keep_i = xs
            h = nnx.merge(graphdef, layer_state)(h, cos, sin, bias, has_key)
            kept = jnp.where(keep_i[:, None, None, None], h[None], kept)
            return (h, kept), None

        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        kept = jnp.zeros((len(select),) + x.shape, x.dtype)
        (h, kept), _ = jax.lax.scan(body, (x, kept), (state, keep))
        outs = []
        for j, s in enumerate(select):
            if s == 0:
                outs.append(x)
            elif s == cfg.layers and self.norm is not None:
                outs.append(self.norm(h))
            else:
                outs.append(kept[j])
        return jnp.stack(outs)
