"""SD3 / SD3.5 ControlNet (diffusers' SD3ControlNetModel) in Flax NNX, on the base's block modules.

latents -> patches (+ cropped position table) [or the base's own patch tokens, for nets without a patch
embedding: the SD3.5-Large nets] + zero-initialised patch embedding of the control latents -> blocks
(joint blocks like the base's, none context pre-only; or x-only blocks when the net has no context
embedder) -> each block's image tokens through its zero-initialised projection -> times the scale.
The outputs are `controlnet_block_samples` for `MMDiT.__call__`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from mmdit_jax.attention import attention
from mmdit_jax.errors import MMDiTError
from mmdit_jax.layers import Buffer, Linear, MLPEmbedder, layer_norm, modulate, timestep_embedding, zeros
from mmdit_jax.sd3.config import MMDiTConfig
from mmdit_jax.sd3.model import JointBlock, Stream, sincos_2d_table
from mmdit_jax.sharding import TOKENS, constrain
from mmdit_jax.stacking import Stack

DIFFUSERS_CLASS = "SD3ControlNetModel"


@dataclasses.dataclass(frozen=True)
class SD3ControlNetConfig:
    num_layers: int = 18
    num_heads: int = 18
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    extra_conditioning_channels: int = 0
    context_dim: int | None = 4096  # None: no context embedder, x-only blocks (SD3.5-Large nets)
    pooled_dim: int = 2048
    pos_embed_max_size: int = 96
    sample_size: int = 128
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    use_pos_embed: bool = True  # False: the net reads the base's patch tokens (SD3.5-Large nets)
    pos_table: bool = True  # diffusers' pos_embed_type "sincos" (True) or None
    # read by pipelines: zero pooled projections for the net and no VAE shift on the control latents
    force_zeros_for_pooled_projection: bool = True
    mlp_ratio: float = 4.0
    family: str = "sd3"

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "head_dim", "patch_size", "in_channels", "pooled_dim",
                     "pos_embed_max_size"):
            if int(getattr(self, name)) < 1:
                raise MMDiTError(f"SD3 ControlNet config: {name}={getattr(self, name)} must be >= 1")
        if self.extra_conditioning_channels < 0:
            raise MMDiTError(f"SD3 ControlNet config: extra_conditioning_channels="
                             f"{self.extra_conditioning_channels} must be >= 0")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise MMDiTError(f"SD3 ControlNet config: dual_attention_layers {bad} outside blocks "
                             f"0..{self.num_layers - 1}")
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(set(self.dual_attention_layers))))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def control_channels(self) -> int:
        return self.in_channels + self.extra_conditioning_channels

    @property
    def joint(self) -> bool:
        """Joint (context + x) blocks; without a context embedder the blocks see x alone."""
        return self.context_dim is not None

    def block_config(self) -> MMDiTConfig:
        """What the shared block modules read (width, heads, QK norm, MLP width)."""
        return MMDiTConfig(num_layers=self.num_layers + 1, num_heads=self.num_heads, head_dim=self.head_dim,
                           qk_norm=self.qk_norm and self.joint, mlp_ratio=self.mlp_ratio)

    def groups(self) -> list[tuple[bool, list[int]]]:
        """Runs of consecutive blocks of one shape (dual attention or not), each one scanned stack."""
        out: list[tuple[bool, list[int]]] = []
        for i in range(self.num_layers):
            dual = self.joint and i in self.dual_attention_layers
            if out and out[-1][0] == dual:
                out[-1][1].append(i)
            else:
                out.append((dual, [i]))
        return out

    def check_base(self, base, origin: str = "ControlNet") -> None:
        """One error line unless this net can steer `base` (an MMDiTConfig)."""
        if getattr(base, "family", None) != self.family:
            raise MMDiTError(f"{origin}: an SD3 ControlNet cannot steer a {getattr(base, 'family', base)!r} "
                             "base model")
        mine = (self.hidden_size, self.patch_size, self.in_channels)
        theirs = (base.hidden_size, base.patch_size, base.in_channels)
        if mine != theirs:
            raise MMDiTError(f"{origin}: (width, patch size, latent channels) {mine} do not match the base "
                             f"model's {theirs}")

    def to_diffusers(self) -> dict:
        return {
            "_class_name": DIFFUSERS_CLASS, "sample_size": self.sample_size, "patch_size": self.patch_size,
            "in_channels": self.in_channels, "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim, "caption_projection_dim": self.hidden_size,
            "pooled_projection_dim": self.pooled_dim, "out_channels": self.in_channels,
            "pos_embed_max_size": self.pos_embed_max_size,
            "extra_conditioning_channels": self.extra_conditioning_channels,
            "dual_attention_layers": list(self.dual_attention_layers),
            "qk_norm": "rms_norm" if self.qk_norm else None,
            "pos_embed_type": "sincos" if self.pos_table else None, "use_pos_embed": self.use_pos_embed,
            "force_zeros_for_pooled_projection": self.force_zeros_for_pooled_projection,
        }

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "SD3ControlNetConfig":
        if cfg.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
            raise MMDiTError(f"{origin}: _class_name {cfg.get('_class_name')!r} is not {DIFFUSERS_CLASS}")
        qk = cfg.get("qk_norm")
        if qk not in (None, "rms_norm"):
            raise MMDiTError(f"{origin}: qk_norm={qk!r} is not supported (only 'rms_norm' or null)")
        pos_type = cfg.get("pos_embed_type", "sincos")
        if pos_type not in (None, "sincos"):
            raise MMDiTError(f"{origin}: pos_embed_type={pos_type!r} is not supported ('sincos' or null)")
        heads, head_dim = int(cfg.get("num_attention_heads", 18)), int(cfg.get("attention_head_dim", 64))
        ctx = cfg.get("joint_attention_dim", 4096)
        cap = cfg.get("caption_projection_dim", 1152)
        if ctx is not None and cap != heads * head_dim:
            raise MMDiTError(f"{origin}: caption_projection_dim={cap} must equal heads*head_dim="
                             f"{heads * head_dim}")
        max_size = cfg.get("pos_embed_max_size", 96)
        use_pos = bool(cfg.get("use_pos_embed", True))
        if max_size is None and use_pos and pos_type is not None:
            raise MMDiTError(f"{origin}: pos_embed_max_size=null (an uncropped position table) is not "
                             "supported")
        return cls(
            num_layers=int(cfg.get("num_layers", 18)), num_heads=heads, head_dim=head_dim,
            patch_size=int(cfg.get("patch_size", 2)), in_channels=int(cfg.get("in_channels", 16)),
            extra_conditioning_channels=int(cfg.get("extra_conditioning_channels", 0)),
            context_dim=None if ctx is None else int(ctx),
            pooled_dim=int(cfg.get("pooled_projection_dim", 2048)),
            pos_embed_max_size=int(max_size or 96), sample_size=int(cfg.get("sample_size", 128)),
            qk_norm=qk == "rms_norm", dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
            use_pos_embed=use_pos, pos_table=pos_type is not None,
            force_zeros_for_pooled_projection=bool(cfg.get("force_zeros_for_pooled_projection", True)),
        )


class XBlock(nnx.Module):
    """An x-only block (diffusers' SD3SingleTransformerBlock): adaLN-Zero, self-attention, MLP."""

    def __init__(self, cfg: MMDiTConfig, *, param_dtype, rngs):
        self.x_block = Stream(cfg, 6, False, param_dtype=param_dtype, rngs=rngs)

    def modulations(self, c):
        return self.x_block.mod.project(c)

    def __call__(self, x, mods):
        x = constrain(x, TOKENS)
        msa, mlp = self.x_block.mod.split(mods)  # the attention's (shift, scale, gate), then the MLP's
        out = attention(*self.x_block.attn(modulate(layer_norm(x), msa.shift, msa.scale)))
        return constrain(self.x_block.update(x, out, msa, mlp), TOKENS)


def patches(latents, p: int):
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), patches flattened as (p, p, c) like the base's."""
    b, hh, ww, ch = latents.shape
    x = latents.reshape(b, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hh // p) * (ww // p), p * p * ch)


def crop_table(table, max_size: int, h: int, w: int):
    """The centred h x w window of a (max_size^2, D) position table, as SD3 crops it."""
    if h > max_size or w > max_size:
        raise MMDiTError(f"latent of {h}x{w} patches exceeds the ControlNet's position table "
                         f"({max_size}x{max_size} patches)")
    top, left = (max_size - h) // 2, (max_size - w) // 2
    return table.reshape(max_size, max_size, -1)[top:top + h, left:left + w].reshape(h * w, -1)


def base_tokens(base, latents):
    """The base MMDiT's patch tokens (patch embedding + cropped position table): what a net without its
    own patch embedding reads (diffusers gives such nets a copy of the transformer's pos_embed)."""
    p = base.config.patch_size
    dtype = base.x_embedder.kernel[...].dtype
    h, w = latents.shape[1] // p, latents.shape[2] // p
    return base.x_embedder(patches(latents.astype(dtype), p)) + base.cropped_pos_embed(h, w)[None]


class SD3ControlNet(nnx.Module):
    def __init__(self, cfg: SD3ControlNetConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        bcfg = cfg.block_config()
        self.x_embedder = Linear(p * p * cfg.in_channels, d, axes=("patch", "embed"), **kw) \
            if cfg.use_pos_embed else None
        self.pos_embed = Buffer(sincos_2d_table(d, cfg.pos_embed_max_size, cfg.sample_size // p)
                                .astype(param_dtype)) if cfg.use_pos_embed and cfg.pos_table else None
        self.t_embedder = MLPEmbedder(256, d, **kw)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, d, **kw)
        self.context_embedder = Linear(cfg.context_dim, d, axes=("cond", "embed"), **kw) if cfg.joint else None
        if cfg.joint:
            make = lambda dual: lambda r: JointBlock(bcfg, dual, False, param_dtype=param_dtype, rngs=r)
        else:
            make = lambda dual: lambda r: XBlock(bcfg, param_dtype=param_dtype, rngs=r)
        self.groups = nnx.List([Stack(make(dual), len(idx), rngs=rngs) for dual, idx in cfg.groups()])
        # zero-initialised: a fresh net adds nothing to the base (diffusers' pos_embed_input and
        # controlnet_blocks)
        self.control_embedder = Linear(p * p * cfg.control_channels, d, axes=("patch", "embed"),
                                       kernel_init=zeros, **kw)
        self.controlnet_blocks = Stack(lambda r: Linear(d, d, axes=("embed", "embed_out"), kernel_init=zeros,
                                                        param_dtype=param_dtype, rngs=r),
                                       cfg.num_layers, rngs=rngs)

    def _check(self, hidden, control):
        cfg = self.config
        p = cfg.patch_size
        if control.ndim != 4 or control.shape[-1] != cfg.control_channels or control.shape[1] % p \
                or control.shape[2] % p:
            raise MMDiTError(f"control latents of shape {control.shape}: need (B, H, W, "
                             f"{cfg.control_channels}) with H and W multiples of {p}")
        if cfg.use_pos_embed:
            if hidden.ndim != 4 or hidden.shape[-1] != cfg.in_channels:
                raise MMDiTError(f"latents of shape {hidden.shape}: need (B, H, W, {cfg.in_channels})")
            if hidden.shape[:3] != control.shape[:3]:
                raise MMDiTError(f"control latents of shape {control.shape} do not match the latents "
                                 f"{hidden.shape} in (B, H, W)")
        else:
            n = (control.shape[1] // p) * (control.shape[2] // p)
            if hidden.ndim != 3 or hidden.shape != (control.shape[0], n, cfg.hidden_size):
                raise MMDiTError(f"this SD3 ControlNet has no patch embedding: pass the base's patch tokens "
                                 f"(sd3.controlnet.base_tokens), (B, N, D) = {(control.shape[0], n, cfg.hidden_size)}"
                                 f", got shape {hidden.shape}")

    def __call__(self, hidden, sigma, context, pooled, control, scale=1.0, *, remat: str = "none"):
        """hidden: latents (B, H, W, C), or the base's patch tokens (B, N, D) for a net without a patch
        embedding; control: (B, H, W, C + extra) control latents; context: None for a net without a
        context embedder. Returns the (num_layers, B, N, D) residuals times `scale`."""
        cfg = self.config
        self._check(hidden, control)
        if (context is None) == cfg.joint:
            raise MMDiTError("this SD3 ControlNet " + ("needs the text context" if cfg.joint else
                             "has no context embedder: pass context=None"))
        dtype = self.control_embedder.kernel[...].dtype
        p = cfg.patch_size
        h, w = control.shape[1] // p, control.shape[2] // p
        if cfg.use_pos_embed:
            x = self.x_embedder(patches(hidden.astype(dtype), p))
            if self.pos_embed is not None:
                x = x + crop_table(self.pos_embed[...], cfg.pos_embed_max_size, h, w)[None]
        else:
            x = hidden.astype(dtype)
        x = x + self.control_embedder(patches(control.astype(dtype), p))
        c = self.t_embedder(timestep_embedding(1000.0 * sigma)) + self.y_embedder(pooled.astype(dtype))
        x = constrain(x, TOKENS)
        samples = []
        if cfg.joint:
            carry = (constrain(self.context_embedder(context.astype(dtype)), TOKENS), x)
            keep = lambda cx, _: (cx, cx[1])  # each block's image tokens
        else:
            carry = x
            keep = lambda x_, _: (x_, x_)
        for group in self.groups:
            carry, ys = group(carry, cond=c, remat=remat, after=(keep, None))
            samples.append(ys)
        ys = jnp.concatenate(samples, axis=0) if len(samples) > 1 else samples[0]
        proj = self.controlnet_blocks.blocks
        out = jnp.einsum("lbnd,lde->lbne", ys, proj.kernel[...]) + proj.bias[...][:, None, None, :]
        return out * jnp.asarray(scale, out.dtype)


def residuals(net: SD3ControlNet, base, latents, sigma, context, pooled, control, scale=1.0, *,
              remat: str = "none") -> dict:
    """One net's residuals as the base MMDiT's keyword arguments; `base` (the base MMDiT module) gives
    nets without a patch embedding its patch tokens."""
    cfg = net.config
    hidden = latents if cfg.use_pos_embed else base_tokens(base, latents)
    out = net(hidden, sigma, context if cfg.joint else None, pooled, control, scale, remat=remat)
    return {"controlnet_block_samples": out}
