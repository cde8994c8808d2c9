"""FLUX.2 transformer in Flax NNX.

latents (B, h, w, 128) and reference latents -> tokens [image; refs...] -> img_in; text -> txt_in;
vec = time_in(sigma) [+ guidance_in(g)]; three modulation projections of vec, shared by all blocks of a
kind (image and text sets for the double blocks, one set for the single blocks) -> double-stream blocks
(per-stream weights, joint attention over [text; image; refs] with 4-axis RoPE, SwiGLU feed-forward) ->
single-stream blocks (fused qkv + SwiGLU input, fused output) -> image tokens only -> final adaLN layer.
No Linear has a bias.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.attention import attention
from mmdit_jax.errors import MMDiTError
from mmdit_jax.flux.rope import apply_rope
from mmdit_jax.flux2.config import Flux2Config
from mmdit_jax.flux2.rope import position_ids, rope_tables
from mmdit_jax.layers import (Linear, ModulationOut, RMSNorm, layer_norm, merge_heads, modulate, split_heads,
                              timestep_embedding)
from mmdit_jax.sharding import TOKENS, constrain
from mmdit_jax.stacking import Stack

TIME_FACTOR = 1000.0  # sigma and guidance scale both enter the sinusoid multiplied by 1000
zeros = nnx.initializers.zeros_init()


class Embedder(nnx.Module):
    """Linear -> SiLU -> Linear without biases (the timestep and guidance embedders)."""

    def __init__(self, din: int, dim: int, *, param_dtype, rngs):
        self.in_layer = Linear(din, dim, axes=("cond", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.out_layer = Linear(dim, dim, axes=("embed", "embed_out"), use_bias=False, param_dtype=param_dtype,
                                rngs=rngs)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class SharedModulation(nnx.Module):
    """SiLU -> Linear(dim, 3 * sets * dim): (shift, scale, gate) per set, used by every block of a kind."""

    def __init__(self, dim: int, sets: int, *, param_dtype, rngs):
        self.lin = Linear(dim, 3 * sets * dim, axes=("embed", "mod"), use_bias=False, kernel_init=zeros,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, vec):
        return self.lin(jax.nn.silu(vec))


def groups(mod, sets: int) -> tuple[ModulationOut, ...]:
    """The `sets` (shift, scale, gate) groups of a modulation vector, each part (B, dim)."""
    parts = jnp.split(mod, 3 * sets, axis=-1)
    return tuple(ModulationOut(*parts[i:i + 3]) for i in range(0, 3 * sets, 3))


def swiglu(h, axis: int):
    """silu(gate) * value, for h holding (gate, value) on `axis` (size 2), which is dropped."""
    return jax.nn.silu(jnp.take(h, 0, axis=axis)) * jnp.take(h, 1, axis=axis)


class StreamAttention(nnx.Module):
    """One stream's fused qkv with per-head RMS QK-norm, and its output projection."""

    def __init__(self, cfg: Flux2Config, *, param_dtype, rngs):
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.heads = cfg.num_heads
        # (in, 3, d): q, k and v each split by heads over "tensor" (see layers.Linear)
        self.qkv = Linear(d, (3, d), axes=("embed", None, "qkv"), use_bias=False, **kw)
        self.q_norm = RMSNorm(cfg.head_dim, **kw)
        self.k_norm = RMSNorm(cfg.head_dim, **kw)
        self.proj = Linear(d, d, axes=("heads", "embed"), use_bias=False, **kw)

    def qkv_heads(self, x):
        qkv = checkpoint_name(self.qkv(x), "qkv")
        q, k, v = (split_heads(qkv[..., i, :], self.heads) for i in range(3))
        return self.q_norm(q), self.k_norm(k), v


class SwiGLU(nnx.Module):
    """linear_in to (gate, value) halves kept on an axis of their own ((d, 2, m): sharding m splits both
    alike) -> silu(gate) * value -> linear_out."""

    def __init__(self, d: int, hidden: int, *, param_dtype, rngs):
        kw = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.linear_in = Linear(d, (2, hidden), axes=("embed", None, "mlp"), **kw)
        self.linear_out = Linear(hidden, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = checkpoint_name(swiglu(self.linear_in(x), -2), "mlp_hidden")
        return self.linear_out(h)


class DoubleBlock(nnx.Module):
    """Text and image streams with their own weights, attending jointly over [text; image]."""

    def __init__(self, cfg: Flux2Config, *, param_dtype, rngs):
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.img_attn = StreamAttention(cfg, **kw)
        self.img_mlp = SwiGLU(d, cfg.mlp_hidden, **kw)
        self.txt_attn = StreamAttention(cfg, **kw)
        self.txt_mlp = SwiGLU(d, cfg.mlp_hidden, **kw)

    def __call__(self, carry, mods, cos, sin):
        txt, img = (constrain(t, TOKENS) for t in carry)
        # per stream: the attention's group, then the MLP's
        img_attn, img_mlp = groups(mods[0], 2)
        txt_attn, txt_mlp = groups(mods[1], 2)
        qi, ki, vi = self.img_attn.qkv_heads(modulate(layer_norm(img), img_attn.shift, img_attn.scale))
        qt, kt, vt = self.txt_attn.qkv_heads(modulate(layer_norm(txt), txt_attn.shift, txt_attn.scale))
        q = apply_rope(jnp.concatenate([qt, qi], 1), cos, sin)
        k = apply_rope(jnp.concatenate([kt, ki], 1), cos, sin)
        out = checkpoint_name(attention(q, k, jnp.concatenate([vt, vi], 1)), "attn_out")
        n_txt = txt.shape[1]
        out_t, out_i = merge_heads(out[:, :n_txt]), merge_heads(out[:, n_txt:])

        img = img + img_attn.gate[:, None] * self.img_attn.proj(out_i)
        img = img + img_mlp.gate[:, None] * self.img_mlp(modulate(layer_norm(img), img_mlp.shift, img_mlp.scale))
        txt = txt + txt_attn.gate[:, None] * self.txt_attn.proj(out_t)
        txt = txt + txt_mlp.gate[:, None] * self.txt_mlp(modulate(layer_norm(txt), txt_mlp.shift, txt_mlp.scale))
        return constrain(txt, TOKENS), constrain(img, TOKENS)


class SingleBlock(nnx.Module):
    """One stream over the joint sequence: attention and SwiGLU computed in parallel from one input.

    linear1 emits [q, k, v, gate, value] in one matmul; linear2 reads [attn_out, silu(gate) * value].
    Both keep these in chunks of width d on an axis of their own ((d, 3 + 2m, d) and (1 + m, d, d),
    m = mlp / d): sharding the width over "tensor" splits q, k, v by heads and gate and value alike."""

    def __init__(self, cfg: Flux2Config, *, param_dtype, rngs):
        d, kw = cfg.hidden_size, dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.m = cfg.num_heads, cfg.mlp_hidden // d
        self.linear1 = Linear(d, (3 + 2 * self.m, d), axes=("embed", None, "mlp"), **kw)
        self.q_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype, rngs=rngs)
        self.k_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype, rngs=rngs)
        self.linear2 = Linear((1 + self.m, d), d, axes=(None, "mlp", "embed"), **kw)

    def __call__(self, x, mods, cos, sin):
        x = constrain(x, TOKENS)
        (m,) = groups(mods, 1)
        h = self.linear1(modulate(layer_norm(x), m.shift, m.scale))  # (B, L, 3 + 2m, d)
        qkv, mlp = checkpoint_name(h[..., :3, :], "qkv"), h[..., 3:, :]
        q, k, v = (split_heads(qkv[..., i, :], self.heads) for i in range(3))
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        attn = checkpoint_name(attention(q, k, v), "attn_out")
        mlp = checkpoint_name(swiglu(mlp.reshape(mlp.shape[:-2] + (2, self.m, mlp.shape[-1])), -3),
                              "mlp_hidden")
        out = x + m.gate[:, None] * self.linear2(jnp.concatenate([merge_heads(attn)[..., None, :], mlp], axis=-2))
        return constrain(out, TOKENS)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear, no biases."""

    def __init__(self, dim: int, out: int, *, param_dtype, rngs):
        kw = dict(use_bias=False, kernel_init=zeros, param_dtype=param_dtype, rngs=rngs)
        self.mod = Linear(dim, 2 * dim, axes=("embed", "mod"), **kw)
        self.linear = Linear(dim, out, axes=("embed", "out"), **kw)

    def __call__(self, x, vec):
        shift, scale = jnp.split(self.mod(jax.nn.silu(vec)), 2, axis=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


def tokens(latents):
    """(B, h, w, C) -> (B, h*w, C), row-major (the pipelines' _pack_latents on NCHW)."""
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


class Flux2(nnx.Module):
    def __init__(self, cfg: Flux2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.img_in = Linear(cfg.in_channels, d, axes=("patch", "embed"), use_bias=False, **kw)
        self.txt_in = Linear(cfg.context_dim, d, axes=("cond", "embed"), use_bias=False, **kw)
        self.time_in = Embedder(cfg.time_channels, d, **kw)
        self.guidance_in = Embedder(cfg.time_channels, d, **kw) if cfg.guidance_embed else None
        self.double_mod_img = SharedModulation(d, 2, **kw)
        self.double_mod_txt = SharedModulation(d, 2, **kw)
        self.single_mod = SharedModulation(d, 1, **kw)
        # one scan per block kind; an empty stack (a truncated test config) is simply absent
        self.double_blocks = Stack(lambda r: DoubleBlock(cfg, param_dtype=param_dtype, rngs=r),
                                   cfg.depth, rngs=rngs) if cfg.depth else None
        self.single_blocks = Stack(lambda r: SingleBlock(cfg, param_dtype=param_dtype, rngs=r),
                                   cfg.depth_single, rngs=rngs) if cfg.depth_single else None
        self.final_layer = FinalLayer(d, cfg.out_channels, **kw)

    def _check(self, latents, context, pooled, guidance, references):
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
            raise MMDiTError(f"latents of shape {latents.shape}: need (B, h, w, {cfg.in_channels}), the "
                             "2x2-patchified, normalised FLUX.2 latents")
        b = latents.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise MMDiTError(f"context of shape {context.shape}: need ({b}, L, {cfg.context_dim})")
        if pooled is not None:
            raise MMDiTError("FLUX.2 takes no pooled text vector; pass None")
        if cfg.guidance_embed and guidance is None:
            raise MMDiTError("this FLUX.2 model (dev-style) has a guidance embedder: pass guidance=(B,) "
                             "guidance scales, e.g. 4.0")
        if not cfg.guidance_embed and guidance is not None:
            raise MMDiTError("this FLUX.2 model (klein-style) has no guidance embedder; pass guidance=None")
        for i, ref in enumerate(references):
            if ref.ndim != 4 or ref.shape[0] != b or ref.shape[-1] != cfg.in_channels:
                raise MMDiTError(f"references[{i}] of shape {ref.shape}: need ({b}, h_{i}, w_{i}, "
                                 f"{cfg.in_channels}), the batch size and channels of the latents")

    def __call__(self, latents, sigma, context, pooled=None, guidance=None, *, references=None,
                 remat: str = "none"):
        cfg = self.config
        references = list(references or ())
        self._check(latents, context, pooled, guidance, references)
        b, h, w, _ = latents.shape
        dtype = self.img_in.kernel[...].dtype
        img = jnp.concatenate([tokens(x.astype(dtype)) for x in [latents, *references]], axis=1)
        img = constrain(self.img_in(img), TOKENS)
        txt = constrain(self.txt_in(context.astype(dtype)), TOKENS)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        vec = self.time_in(timestep_embedding(TIME_FACTOR * sigma, cfg.time_channels).astype(dtype))
        if self.guidance_in is not None:
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
            vec = vec + self.guidance_in(timestep_embedding(TIME_FACTOR * g, cfg.time_channels).astype(dtype))
        ids = position_ids(txt.shape[1], (h, w), [r.shape[1:3] for r in references])
        cos, sin = rope_tables(ids, cfg.axes_dim, cfg.theta)

        if self.double_blocks is not None:
            mods = (self.double_mod_img(vec), self.double_mod_txt(vec))
            txt, img = self.double_blocks((txt, img), mods, cos, sin, remat=remat)
        n_txt = txt.shape[1]
        x = constrain(jnp.concatenate([txt, img], axis=1), TOKENS)
        if self.single_blocks is not None:
            x = self.single_blocks(x, self.single_mod(vec), cos, sin, remat=remat)
        # only the image tokens are predicted: text and reference tokens are dropped
        img = constrain(x, TOKENS)[:, n_txt:n_txt + h * w]
        return self.final_layer(img, vec).reshape(b, h, w, cfg.out_channels)
