"""FLUX.1 ControlNet (diffusers' FluxControlNetModel) in Flax NNX, on the base's block modules.

latents -> packed tokens -> img_in, + control embedding of the packed control latents (zero-initialised;
XLabs nets first turn a control image into latents with a small conv stack, `input_hint_block`) ->
[Union nets: the control mode's embedding is put before the text tokens] -> double blocks -> single
blocks -> each block's image tokens through its zero-initialised projection -> times the scale.
The outputs are `controlnet_block_samples` / `controlnet_single_block_samples` for `Flux.__call__`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.flux.model import TIME_FACTOR, DoubleBlock, SingleBlock, pack
from mmdit_jax.flux.rope import rope_tables
from mmdit_jax.layers import Linear, MLPEmbedder, param, timestep_embedding, zeros
from mmdit_jax.sharding import TOKENS, constrain
from mmdit_jax.stacking import Stack
from mmdit_jax.vae.network import Conv

DIFFUSERS_CLASS = "FluxControlNetModel"
HINT_CHANNELS = 16  # width of every conv in the input hint block (diffusers' block_out_channels)
HINT_STAGES = 3  # stride-2 convolutions: the hint block downsamples the control image 8x


@dataclasses.dataclass(frozen=True)
class FluxControlNetConfig:
    in_channels: int = 64  # 16 latent channels packed 2x2
    num_heads: int = 24
    head_dim: int = 128
    depth: int = 19
    depth_single: int = 38
    context_dim: int = 4096
    pooled_dim: int = 768
    axes_dim: tuple[int, ...] = (16, 56, 56)
    guidance_embed: bool = False
    num_mode: int | None = None  # Union nets: the number of control modes
    # XLabs nets: channels of the conv stack's output (None: the control input is already latents)
    conditioning_embedding_channels: int | None = None
    patch_size: int = 1  # patch size of the hint block's output (only read with a hint block)
    family: str = "flux"

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        self.block_config()  # validates widths and RoPE axes
        if self.num_mode is not None and self.num_mode < 1:
            raise MMDiTError(f"FLUX ControlNet config: num_mode={self.num_mode} must be >= 1")
        c = self.conditioning_embedding_channels
        if c is not None and c * self.patch_size ** 2 != self.in_channels:
            raise MMDiTError(f"FLUX ControlNet config: conditioning_embedding_channels={c} times "
                             f"patch_size^2={self.patch_size ** 2} must equal in_channels={self.in_channels}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def union(self) -> bool:
        return self.num_mode is not None

    @property
    def hint(self) -> bool:
        return self.conditioning_embedding_channels is not None

    def block_config(self) -> FluxConfig:
        """What the shared block modules read."""
        return FluxConfig(in_channels=self.in_channels, out_channels=self.in_channels, num_heads=self.num_heads,
                          head_dim=self.head_dim, depth=self.depth, depth_single=self.depth_single,
                          context_dim=self.context_dim, pooled_dim=self.pooled_dim, axes_dim=self.axes_dim,
                          guidance_embed=self.guidance_embed)

    def check_base(self, base, origin: str = "ControlNet") -> None:
        """One error line unless this net can steer `base` (a FluxConfig)."""
        if getattr(base, "family", None) != self.family:
            raise MMDiTError(f"{origin}: a FLUX ControlNet cannot steer a {getattr(base, 'family', base)!r} "
                             "base model")
        mine = (self.hidden_size, self.in_channels)
        theirs = (base.hidden_size, base.in_channels)
        if mine != theirs:
            raise MMDiTError(f"{origin}: (width, packed channels) {mine} do not match the base model's {theirs}")

    def to_diffusers(self) -> dict:
        return {"_class_name": DIFFUSERS_CLASS, "patch_size": self.patch_size, "in_channels": self.in_channels,
                "num_layers": self.depth, "num_single_layers": self.depth_single,
                "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
                "joint_attention_dim": self.context_dim, "pooled_projection_dim": self.pooled_dim,
                "guidance_embeds": self.guidance_embed, "axes_dims_rope": list(self.axes_dim),
                "num_mode": self.num_mode,
                "conditioning_embedding_channels": self.conditioning_embedding_channels}

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "FluxControlNetConfig":
        if cfg.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
            raise MMDiTError(f"{origin}: _class_name {cfg.get('_class_name')!r} is not {DIFFUSERS_CLASS}")
        mode, hint = cfg.get("num_mode"), cfg.get("conditioning_embedding_channels")
        return cls(
            in_channels=int(cfg.get("in_channels", 64)), num_heads=int(cfg.get("num_attention_heads", 24)),
            head_dim=int(cfg.get("attention_head_dim", 128)), depth=int(cfg.get("num_layers", 19)),
            depth_single=int(cfg.get("num_single_layers", 38)),
            context_dim=int(cfg.get("joint_attention_dim", 4096)),
            pooled_dim=int(cfg.get("pooled_projection_dim", 768)),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
            num_mode=None if mode is None else int(mode),
            conditioning_embedding_channels=None if hint is None else int(hint),
            patch_size=int(cfg.get("patch_size", 1)),
        )


class HintBlock(nnx.Module):
    """XLabs' control image encoder (diffusers' ControlNetConditioningEmbedding with 16-wide convs):
    conv + SiLU, then per stage a conv and a stride-2 conv, each + SiLU, then a zero-initialised conv."""

    def __init__(self, out_channels: int, *, param_dtype, rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.conv_in = Conv(3, HINT_CHANNELS, **kw)
        self.convs = nnx.List([Conv(HINT_CHANNELS, HINT_CHANNELS, stride=1 + (i % 2), **kw)
                               for i in range(2 * HINT_STAGES)])
        self.conv_out = Conv(HINT_CHANNELS, out_channels, **kw)
        self.conv_out.kernel[...] = jnp.zeros_like(self.conv_out.kernel[...])

    def __call__(self, image):
        x = jax.nn.silu(self.conv_in(image))
        for conv in self.convs:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


def patch_tokens(x, p: int):
    """(B, H, W, C) -> (B, H/p * W/p, C*p*p), channels ordered (c, ph, pw) as diffusers flattens."""
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (hh // p) * (ww // p), c * p * p)


class FluxControlNet(nnx.Module):
    def __init__(self, cfg: FluxControlNetConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d, kw = cfg.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        bcfg = cfg.block_config()
        self.img_in = Linear(cfg.in_channels, d, axes=("patch", "embed"), **kw)
        self.time_in = MLPEmbedder(256, d, **kw)
        self.guidance_in = MLPEmbedder(256, d, **kw) if cfg.guidance_embed else None
        self.vector_in = MLPEmbedder(cfg.pooled_dim, d, **kw)
        self.txt_in = Linear(cfg.context_dim, d, axes=("cond", "embed"), **kw)
        self.double_blocks = Stack(lambda r: DoubleBlock(bcfg, param_dtype=param_dtype, rngs=r),
                                   cfg.depth, rngs=rngs) if cfg.depth else None
        self.single_blocks = Stack(lambda r: SingleBlock(bcfg, param_dtype=param_dtype, rngs=r),
                                   cfg.depth_single, rngs=rngs) if cfg.depth_single else None
        proj = lambda r: Linear(d, d, axes=("embed", "embed_out"), kernel_init=zeros, param_dtype=param_dtype,
                                rngs=r)
        self.controlnet_blocks = Stack(proj, cfg.depth, rngs=rngs) if cfg.depth else None
        self.controlnet_single_blocks = Stack(proj, cfg.depth_single, rngs=rngs) if cfg.depth_single else None
        self.mode_embedder = param(nnx.initializers.normal(1.0), rngs.params(), (cfg.num_mode, d), param_dtype,
                                   ("cond", "embed")) if cfg.union else None
        self.hint_block = HintBlock(cfg.conditioning_embedding_channels, **kw) if cfg.hint else None
        # zero-initialised (a fresh net adds nothing) unless a hint block, itself zero at its output, feeds it
        self.control_embedder = Linear(cfg.in_channels, d, axes=("patch", "embed"),
                                       **({} if cfg.hint else {"kernel_init": zeros}), **kw)

    def _check(self, latents, control, guidance, control_mode):
        cfg = self.config
        c = cfg.in_channels // 4
        if latents.ndim != 4 or latents.shape[-1] != c or latents.shape[1] % 2 or latents.shape[2] % 2:
            raise MMDiTError(f"latents of shape {latents.shape}: need (B, H, W, {c}) with H and W even")
        b, hh, ww = latents.shape[:3]
        # the hint block's output, 8x smaller than the image, is cut into patches of patch_size: one per token
        up = 4 * cfg.patch_size
        want = (b, hh * up, ww * up, 3) if cfg.hint else (b, hh, ww, c)
        if tuple(control.shape) != want:
            raise MMDiTError(f"control {'image' if cfg.hint else 'latents'} of shape {control.shape}: this FLUX "
                             f"ControlNet needs {want} for latents of shape {latents.shape}")
        if cfg.guidance_embed != (guidance is not None):
            raise MMDiTError("this FLUX ControlNet " + ("has a guidance embedder: pass guidance=(B,) scales"
                                                        if cfg.guidance_embed else "has no guidance embedder: "
                                                        "pass guidance=None"))
        if cfg.union and control_mode is None:
            raise MMDiTError(f"this FLUX ControlNet is a Union net: pass control_mode (0..{cfg.num_mode - 1})")
        if not cfg.union and control_mode is not None:
            raise MMDiTError("this FLUX ControlNet has no control modes (not a Union net): pass control_mode=None")
        if isinstance(control_mode, int) and not 0 <= control_mode < cfg.num_mode:
            raise MMDiTError(f"control_mode={control_mode} outside 0..{cfg.num_mode - 1}")

    def __call__(self, latents, sigma, context, pooled, control, scale=1.0, guidance=None, control_mode=None, *,
                 remat: str = "none") -> dict:
        """latents (B, H, W, 16); control: (B, H, W, 16) control latents, or for nets with a hint block
        the (B, 4pH, 4pW, 3) control image (p = patch_size); control_mode: int or (B,) ints (Union nets).
        Returns the base's residual keyword arguments, each (n blocks, B, N, D) times `scale`."""
        cfg = self.config
        self._check(latents, control, guidance, control_mode)
        b, hh, ww, _ = latents.shape
        dtype = self.img_in.kernel[...].dtype
        img = self.img_in(pack(latents.astype(dtype)))
        if self.hint_block is not None:
            cond = patch_tokens(self.hint_block(control.astype(dtype)), cfg.patch_size)
        else:
            cond = pack(control.astype(dtype))
        img = constrain(img + self.control_embedder(cond), TOKENS)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        vec = self.time_in(timestep_embedding(TIME_FACTOR * sigma))
        if self.guidance_in is not None:
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
            vec = vec + self.guidance_in(timestep_embedding(TIME_FACTOR * g))
        vec = vec + self.vector_in(pooled.astype(dtype))
        txt = self.txt_in(context.astype(dtype))
        if self.mode_embedder is not None:  # the mode's embedding leads the text tokens
            mode = jnp.broadcast_to(jnp.asarray(control_mode, jnp.int32), (b,))
            txt = jnp.concatenate([self.mode_embedder[...][mode][:, None].astype(txt.dtype), txt], axis=1)
        txt = constrain(txt, TOKENS)
        n_txt = txt.shape[1]
        cos, sin = rope_tables(n_txt, hh // 2, ww // 2, cfg.axes_dim)

        out = {"controlnet_block_samples": None, "controlnet_single_block_samples": None}
        if self.double_blocks is not None:
            (txt, img), ys = self.double_blocks((txt, img), cos, sin, cond=vec, remat=remat,
                                                after=(lambda c, _: (c, c[1]), None))
            out["controlnet_block_samples"] = self._project(self.controlnet_blocks, ys, scale)
        if self.single_blocks is not None:
            x = constrain(jnp.concatenate([txt, img], axis=1), TOKENS)
            _, ys = self.single_blocks(x, cos, sin, cond=vec, remat=remat,
                                       after=(lambda x_, _: (x_, x_[:, n_txt:]), None))
            out["controlnet_single_block_samples"] = self._project(self.controlnet_single_blocks, ys, scale)
        return out

    @staticmethod
    def _project(stack, ys, scale):
        proj = stack.blocks
        y = jnp.einsum("lbnd,lde->lbne", ys, proj.kernel[...]) + proj.bias[...][:, None, None, :]
        return y * jnp.asarray(scale, y.dtype)
