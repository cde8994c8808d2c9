"""MMDiT (SD3) and MMDiT-X (SD3.5) in Flax NNX, read top to bottom as in the SD3 paper.

latents (B, H, W, C) -> patches -> + cropped position table -> joint blocks (context and x streams
attending jointly, adaLN-modulated by c = t_emb + y_emb) -> final adaLN layer -> unpatchify.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.attention import attention
from mmdit_jax.errors import MMDiTError
from mmdit_jax.layers import (Buffer, FinalLayer, Linear, MLP, MLPEmbedder, Modulation, ModulationOut, RMSNorm,
                              layer_norm, merge_heads, modulate, split_heads, timestep_embedding)
from mmdit_jax.sd3.config import MMDiTConfig
from mmdit_jax.sharding import TOKENS, constrain
from mmdit_jax.stacking import Stack
from mmdit_jax.sd3.control_residuals import residual_after




def sincos_2d_table(dim: int, grid: int, base: int):
    """The fixed 2D sin-cos table SD3 is initialised with, (grid*grid, dim), rows row-major.

    First half encodes the column coordinate, second half the row (the references' meshgrid order).
    Written in jnp so `nnx.eval_shape` never materialises it."""
    coords = jnp.arange(grid, dtype=jnp.float32) / (grid / base)
    cols, rows = jnp.meshgrid(coords, coords)  # (grid, grid): cols varies along a row

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (jnp.arange(d // 2, dtype=jnp.float32) / (d / 2))
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)

    return jnp.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


class QKV(nnx.Module):
    """Fused qkv projection with optional per-head RMSNorm on q and k."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, *, param_dtype, rngs):
        self.heads = heads
        # (in, 3, dim): q, k and v each split by heads over "tensor" (see layers.Linear)
        self.qkv = Linear(dim, (3, dim), axes=("embed", None, "qkv"), param_dtype=param_dtype, rngs=rngs)
        hd = dim // heads
        self.q_norm = RMSNorm(hd, param_dtype=param_dtype, rngs=rngs) if qk_norm else None
        self.k_norm = RMSNorm(hd, param_dtype=param_dtype, rngs=rngs) if qk_norm else None

    def __call__(self, x):
        qkv = checkpoint_name(self.qkv(x), "qkv")
        q, k, v = (split_heads(qkv[..., i, :], self.heads) for i in range(3))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class Stream(nnx.Module):
    """One modality's half of a joint block: adaLN, qkv, and (unless pre_only) output proj + MLP."""

    def __init__(self, cfg: MMDiTConfig, n_mod: int, pre_only: bool, *, param_dtype, rngs):
        d = cfg.hidden_size
        self.pre_only = pre_only
        self.mod = Modulation(d, n_mod, param_dtype=param_dtype, rngs=rngs)
        self.attn = QKV(d, cfg.num_heads, cfg.qk_norm, param_dtype=param_dtype, rngs=rngs)
        if not pre_only:
            self.proj = Linear(d, d, axes=("heads", "embed"), param_dtype=param_dtype, rngs=rngs)
            self.mlp = MLP(d, cfg.mlp_hidden, param_dtype=param_dtype, rngs=rngs)

    def update(self, x, attn_out, msa: ModulationOut, mlp: ModulationOut):
        x = x + msa.gate[:, None] * self.proj(merge_heads(attn_out))
        return x + mlp.gate[:, None] * self.mlp(modulate(layer_norm(x), mlp.shift, mlp.scale))


class SelfAttention(nnx.Module):
    """MMDiT-X's second, x-only attention."""

    def __init__(self, cfg: MMDiTConfig, *, param_dtype, rngs):
        d = cfg.hidden_size
        self.attn = QKV(d, cfg.num_heads, cfg.qk_norm, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(d, d, axes=("heads", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(merge_heads(attention(*self.attn(x))))


class JointBlock(nnx.Module):
    def __init__(self, cfg: MMDiTConfig, dual: bool, pre_only: bool, *, param_dtype, rngs):
        self.dual, self.pre_only = dual, pre_only
        self.context_block = Stream(cfg, 2 if pre_only else 6, pre_only, param_dtype=param_dtype, rngs=rngs)
        self.x_block = Stream(cfg, 9 if dual else 6, False, param_dtype=param_dtype, rngs=rngs)
        self.attn2 = SelfAttention(cfg, param_dtype=param_dtype, rngs=rngs) if dual else None

    def modulations(self, c):
        """Both streams' adaLN projections of the conditioning vector (see `Stack`)."""
        return self.x_block.mod.project(c), self.context_block.mod.project(c)

    def __call__(self, carry, mods):
        ctx, x = (constrain(t, TOKENS) for t in carry)  # tokens split over "sequence" when it is > 1
        # x groups: attention, MLP[, attn2]; context: attention, MLP (attention's shift/scale only if pre_only)
        x_msa, x_mlp, *x_msa2 = self.x_block.mod.split(mods[0])
        c_msa, *c_mlp = self.context_block.mod.split(mods[1])
        x_norm = layer_norm(x)
        qx, kx, vx = self.x_block.attn(modulate(x_norm, x_msa.shift, x_msa.scale))
        qc, kc, vc = self.context_block.attn(modulate(layer_norm(ctx), c_msa.shift, c_msa.scale))
        n_ctx = ctx.shape[1]
        out = attention(jnp.concatenate([qc, qx], 1), jnp.concatenate([kc, kx], 1),
                        jnp.concatenate([vc, vx], 1))
        out = checkpoint_name(out, "attn_out")
        out_c, out_x = out[:, :n_ctx], out[:, n_ctx:]

        new_x = x + x_msa.gate[:, None] * self.x_block.proj(merge_heads(out_x))
        if self.dual:
            # attn2 sees x before the joint-attention update, with its own modulation
            (m2,) = x_msa2
            new_x = new_x + m2.gate[:, None] * self.attn2(modulate(x_norm, m2.shift, m2.scale))
        new_x = new_x + x_mlp.gate[:, None] * self.x_block.mlp(modulate(layer_norm(new_x), x_mlp.shift, x_mlp.scale))
        if not self.pre_only:
            ctx = self.context_block.update(ctx, out_c, c_msa, c_mlp[0])
        return constrain(ctx, TOKENS), constrain(new_x, TOKENS)


class MMDiT(nnx.Module):
    def __init__(self, cfg: MMDiTConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.x_embedder = Linear(p * p * cfg.in_channels, d, axes=("patch", "embed"), **kw)
        table = sincos_2d_table(d, cfg.pos_embed_max_size, cfg.sample_size // p)
        self.pos_embed = Buffer(table.astype(param_dtype))
        self.t_embedder = MLPEmbedder(256, d, **kw)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, d, **kw)
        # zero output: a student built from a teacher's weights starts as the teacher, at any guidance
        self.g_embedder = MLPEmbedder(256, d, zero_out=True, **kw) if cfg.guidance_embed else None
        self.context_embedder = Linear(cfg.context_dim, d, axes=("cond", "embed"), **kw)
        self.groups = nnx.List([
            Stack(lambda r, k=kind: JointBlock(cfg, *k, param_dtype=param_dtype, rngs=r), len(idx), rngs=rngs)
            for kind, idx in cfg.groups()])
        self.final_layer = FinalLayer(d, p * p * cfg.out_channels, **kw)

    def cropped_pos_embed(self, h: int, w: int):
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            raise MMDiTError(f"latent of {h}x{w} patches exceeds the position table "
                             f"({m}x{m} patches, i.e. latents up to {m * self.config.patch_size}px a side)")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed[...].reshape(m, m, -1)
        return table[top:top + h, left:left + w].reshape(h * w, -1)

    def __call__(self, latents, sigma, context, pooled, guidance=None, *, remat: str = "none",
                 skip_layers: tuple[int, ...] = (), controlnet_block_samples=None):
        """`skip_layers`: indices of joint blocks to bypass (diffusers' skip-layer guidance).
        `controlnet_block_samples`: ControlNet residuals, (K, B, N, D) or K arrays (B, N, D), added to
        the image stream after the blocks as diffusers does (see sd3.controlnet.residual_after)."""
        cfg = self.config
        if guidance is not None and not cfg.guidance_embed:
            raise MMDiTError("this SD3-family model has no guidance embedder; pass guidance=None "
                             "(use classifier-free guidance in the sampler instead)")
        if guidance is None and cfg.guidance_embed:
            raise MMDiTError("this SD3-family model has a guidance embedder (guidance-distilled): pass "
                             "guidance=(B,) guidance scales")
        b, hh, ww, ch = latents.shape
        p = cfg.patch_size
        if hh % p or ww % p or ch != cfg.in_channels:
            raise MMDiTError(f"latents of shape {latents.shape}: need (B, H, W, {cfg.in_channels}) "
                             f"with H and W multiples of {p}")
        dtype = self.x_embedder.kernel[...].dtype
        h, w = hh // p, ww // p
        x = latents.astype(dtype).reshape(b, h, p, w, p, ch).transpose(0, 1, 3, 2, 4, 5)
        x = self.x_embedder(x.reshape(b, h * w, p * p * ch)) + self.cropped_pos_embed(h, w)[None]
        c = self.t_embedder(timestep_embedding(1000.0 * sigma)) + self.y_embedder(pooled.astype(dtype))
        if self.g_embedder is not None:  # as FLUX feeds it: 1000 * g through the sinusoid
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
            c = c + self.g_embedder(timestep_embedding(1000.0 * g))
        ctx = self.context_embedder(context.astype(dtype))
        # the blocks' scan carries these whole over "tensor": computed split, they would be gathered
        # inside it
        ctx, x = constrain(ctx, TOKENS), constrain(x, TOKENS)
        bad = [i for i in skip_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise MMDiTError(f"skip_layers {bad} outside blocks 0..{cfg.num_layers - 1}")
        residuals = residual_after(cfg, controlnet_block_samples, x.shape)
        for group, (kind, idx) in zip(self.groups, cfg.groups()):
            skip = [i in skip_layers for i in idx] if skip_layers else None
            after = residuals(kind, idx)
            out = group((ctx, x), cond=c, remat=remat, skip=skip, after=after)
            ctx, x = out if after is None else out[0]
        # whole over "tensor" here too: the final layer's split adaLN would otherwise pull the scan's
        # carry apart
        x = self.final_layer(constrain(x, TOKENS), c)
        x = x.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, hh, ww, cfg.out_channels)
