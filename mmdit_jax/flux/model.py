"""FLUX.1 transformer in Flax NNX, read top to bottom as in BFL's model.py.

latents (B, H, W, 16) -> 2x2 packing to 64-channel tokens -> img_in; T5 context -> txt_in;
vec = time_in(t) [+ guidance_in(g)] + vector_in(pooled) -> double-stream blocks (per-stream weights,
joint attention over [text; image] with RoPE) -> single-stream blocks on the joint sequence ->
text tokens dropped -> final adaLN layer -> unpacking.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.attention import attention
from mmdit_jax.errors import MMDiTError
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.flux.control_residuals import residuals_after
from mmdit_jax.flux.rope import apply_rope, rope_tables
from mmdit_jax.layers import (FinalLayer, Linear, MLP, MLPEmbedder, Modulation, RMSNorm, gelu_tanh,
                              layer_norm, merge_heads, modulate, split_heads, timestep_embedding)
from mmdit_jax.sharding import TOKENS, constrain
from mmdit_jax.stacking import Stack

TIME_FACTOR = 1000.0  # sigma and guidance scale both enter the sinusoid multiplied by 1000


class StreamAttention(nnx.Module):
    """One stream's fused qkv with per-head RMS QK-norm, and its output projection."""

    def __init__(self, cfg: FluxConfig, *, param_dtype, rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        # (in, 3, d): q, k and v each split by heads over "tensor" (see layers.Linear)
        self.qkv = Linear(d, (3, d), axes=("embed", None, "qkv"), use_bias=cfg.qkv_bias,
                          param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype, rngs=rngs)
        self.k_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(d, d, axes=("heads", "embed"), param_dtype=param_dtype, rngs=rngs)

    def qkv_heads(self, x):
        qkv = checkpoint_name(self.qkv(x), "qkv")
        q, k, v = (split_heads(qkv[..., i, :], self.heads) for i in range(3))
        return self.q_norm(q), self.k_norm(k), v


class DoubleBlock(nnx.Module):
    """Text and image streams with their own weights, attending jointly over [text; image]."""

    def __init__(self, cfg: FluxConfig, *, param_dtype, rngs):
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.img_mod = Modulation(d, 6, **kw)
        self.img_attn = StreamAttention(cfg, **kw)
        self.img_mlp = MLP(d, cfg.mlp_hidden, **kw)
        self.txt_mod = Modulation(d, 6, **kw)
        self.txt_attn = StreamAttention(cfg, **kw)
        self.txt_mlp = MLP(d, cfg.mlp_hidden, **kw)

    def modulations(self, vec):
        """Both streams' adaLN projections of `vec` (see `Stack`)."""
        return self.img_mod.project(vec), self.txt_mod.project(vec)

    def __call__(self, carry, mods, cos, sin):
        txt, img = (constrain(t, TOKENS) for t in carry)
        # each stream: an attention group, then an MLP group
        img_attn, img_mlp = self.img_mod.split(mods[0])
        txt_attn, txt_mlp = self.txt_mod.split(mods[1])
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
    """One stream over the joint sequence: attention and MLP computed in parallel from one input.

    linear1 emits [q, k, v, mlp_in] in one matmul; linear2 reads [attn_out, gelu(mlp_in)]. Both keep
    these in chunks of width d on an axis of their own ((d, 3 + m, d) and (1 + m, d, d), m = mlp / d):
    sharding the width over "tensor" splits q, k, v by heads and the MLP by columns, with no chunk
    crossing a shard."""

    def __init__(self, cfg: FluxConfig, *, param_dtype, rngs):
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.heads, self.hidden = cfg.num_heads, d
        m = cfg.mlp_hidden // d
        self.modulation = Modulation(d, 3, **kw)  # shift, scale, gate
        self.linear1 = Linear(d, (3 + m, d), axes=("embed", None, "mlp"), **kw)
        self.q_norm = RMSNorm(cfg.head_dim, **kw)
        self.k_norm = RMSNorm(cfg.head_dim, **kw)
        self.linear2 = Linear((1 + m, d), d, axes=(None, "mlp", "embed"), **kw)

    def modulations(self, vec):
        return self.modulation.project(vec)

    def __call__(self, x, mods, cos, sin):
        x = constrain(x, TOKENS)
        (m,) = self.modulation.split(mods)
        h = self.linear1(modulate(layer_norm(x), m.shift, m.scale))  # (B, L, 3 + m, d)
        qkv, mlp = checkpoint_name(h[..., :3, :], "qkv"), h[..., 3:, :]
        q, k, v = (split_heads(qkv[..., i, :], self.heads) for i in range(3))
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        attn = checkpoint_name(attention(q, k, v), "attn_out")
        mlp = checkpoint_name(gelu_tanh(mlp), "mlp_hidden")
        out = x + m.gate[:, None] * self.linear2(jnp.concatenate([merge_heads(attn)[..., None, :], mlp], axis=-2))
        return constrain(out, TOKENS)


def pack(latents):
    """(B, H, W, C) -> (B, H/2 * W/2, C*4), token channels ordered (c, ph, pw) as FLUX was trained."""
    b, hh, ww, c = latents.shape
    x = latents.reshape(b, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(tokens, hh: int, ww: int):
    """Inverse of `pack`: (B, H/2 * W/2, C*4) -> (B, H, W, C)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, hh // 2, ww // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, hh, ww, c)


class Flux(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.img_in = Linear(cfg.in_channels, d, axes=("patch", "embed"), **kw)
        self.time_in = MLPEmbedder(256, d, **kw)
        self.guidance_in = MLPEmbedder(256, d, **kw) if cfg.guidance_embed else None
        self.vector_in = MLPEmbedder(cfg.pooled_dim, d, **kw)
        self.txt_in = Linear(cfg.context_dim, d, axes=("cond", "embed"), **kw)
        # one scan per block kind; an empty stack (a truncated test config) is simply absent
        self.double_blocks = Stack(lambda r: DoubleBlock(cfg, param_dtype=param_dtype, rngs=r),
                                   cfg.depth, rngs=rngs) if cfg.depth else None
        self.single_blocks = Stack(lambda r: SingleBlock(cfg, param_dtype=param_dtype, rngs=r),
                                   cfg.depth_single, rngs=rngs) if cfg.depth_single else None
        self.final_layer = FinalLayer(d, cfg.out_channels, **kw)

    def _check(self, latents, guidance):
        cfg = self.config
        if cfg.guidance_embed and guidance is None:
            raise MMDiTError("this FLUX model (dev-style) has a guidance embedder: pass guidance=(B,) "
                             "guidance scales, e.g. 3.5")
        if not cfg.guidance_embed and guidance is not None:
            raise MMDiTError("this FLUX model (schnell-style) has no guidance embedder; pass guidance=None")
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise MMDiTError(f"latents of shape {latents.shape}: need (B, H, W, {cfg.latent_channels})")
        if latents.shape[1] % 2 or latents.shape[2] % 2:
            raise MMDiTError(f"latents of shape {latents.shape}: H and W must be even (FLUX packs 2x2 "
                             "latent pixels into one token)")

    def __call__(self, latents, sigma, context, pooled, guidance=None, *, remat: str = "none",
                 controlnet_block_samples=None, controlnet_single_block_samples=None,
                 controlnet_blocks_repeat: bool = False):
        """controlnet_*_samples: ControlNet residuals, (K, B, N, D) or K arrays (B, N, D), added to the
        image tokens after the double / single blocks as diffusers does (see flux.control_residuals)."""
        cfg = self.config
        self._check(latents, guidance)
        b, hh, ww, _ = latents.shape
        dtype = self.img_in.kernel[...].dtype
        img = self.img_in(pack(latents.astype(dtype)))
        txt = self.txt_in(context.astype(dtype))
        # the blocks' scans carry these whole over "tensor": computed split, they would be gathered
        # inside them
        img, txt = constrain(img, TOKENS), constrain(txt, TOKENS)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        vec = self.time_in(timestep_embedding(TIME_FACTOR * sigma))
        if self.guidance_in is not None:
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
            vec = vec + self.guidance_in(timestep_embedding(TIME_FACTOR * g))
        vec = vec + self.vector_in(pooled.astype(dtype))
        cos, sin = rope_tables(txt.shape[1], hh // 2, ww // 2, cfg.axes_dim, cfg.theta)

        double_after, single_after = residuals_after(cfg, controlnet_block_samples, controlnet_single_block_samples,
                                                     controlnet_blocks_repeat, img.shape, txt.shape[1])
        if self.double_blocks is not None:
            out = self.double_blocks((txt, img), cos, sin, cond=vec, remat=remat, after=double_after)
            txt, img = out if double_after is None else out[0]
        n_txt = txt.shape[1]
        x = constrain(jnp.concatenate([txt, img], axis=1), TOKENS)
        if self.single_blocks is not None:
            out = self.single_blocks(x, cos, sin, cond=vec, remat=remat, after=single_after)
            x = out if single_after is None else out[0]
        # whole over "tensor" here too: the final layer's split adaLN would otherwise pull the scans'
        # carries apart
        img = constrain(x, TOKENS)[:, n_txt:]  # text tokens are dropped: only image tokens are predicted
        return unpack(self.final_layer(img, vec), hh, ww)
