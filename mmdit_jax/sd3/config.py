"""SD3 / SD3.5 (MMDiT, MMDiT-X) configuration and presets for the released networks."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from mmdit_jax.errors import MMDiTError


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096  # T5 width (CLIP features are zero-padded to it)
    pooled_dim: int = 2048
    pos_embed_max_size: int = 192
    sample_size: int = 128  # latent size the sin-cos table was built for (from-scratch init only)
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0
    # a guidance embedder (a guidance-distilled student, FLUX.1-dev style): not in diffusers' SD3 model;
    # kept in config.json as "guidance_embeds" so our folders round-trip it
    guidance_embed: bool = False
    family: str = "sd3"

    def __post_init__(self):
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers - 1]
        if bad:
            raise MMDiTError(f"dual_attention_layers {bad} outside blocks 0..{self.num_layers - 2}")
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(set(self.dual_attention_layers))))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def block_kinds(self) -> list[tuple[bool, bool]]:
        """(dual_attention, context_pre_only) for each block, in order."""
        return [(i in self.dual_attention_layers, i == self.num_layers - 1) for i in range(self.num_layers)]

    def groups(self) -> list[tuple[tuple[bool, bool], list[int]]]:
        """Maximal runs of consecutive blocks of one shape: each run is one scanned stack."""
        out: list[tuple[tuple[bool, bool], list[int]]] = []
        for i, kind in enumerate(self.block_kinds()):
            if out and out[-1][0] == kind:
                out[-1][1].append(i)
            else:
                out.append((kind, [i]))
        return out

    # diffusers SD3Transformer2DModel config.json <-> this config
    def to_diffusers(self) -> dict:
        return {
            "_class_name": "SD3Transformer2DModel", "sample_size": self.sample_size,
            "patch_size": self.patch_size, "in_channels": self.in_channels, "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim, "caption_projection_dim": self.hidden_size,
            "pooled_projection_dim": self.pooled_dim, "out_channels": self.out_channels,
            "pos_embed_max_size": self.pos_embed_max_size,
            "dual_attention_layers": list(self.dual_attention_layers),
            "qk_norm": "rms_norm" if self.qk_norm else None,
            **({"guidance_embeds": True} if self.guidance_embed else {}),
        }

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "MMDiTConfig":
        qk = cfg.get("qk_norm")
        if qk not in (None, "rms_norm"):
            raise MMDiTError(f"{origin}: qk_norm={qk!r} is not supported (only 'rms_norm' or null)")
        heads, head_dim = int(cfg.get("num_attention_heads", 18)), int(cfg.get("attention_head_dim", 64))
        cap = cfg.get("caption_projection_dim", heads * head_dim)
        if cap != heads * head_dim:
            raise MMDiTError(f"{origin}: caption_projection_dim={cap} must equal heads*head_dim="
                             f"{heads * head_dim}")
        return cls(
            num_layers=int(cfg.get("num_layers", 18)), num_heads=heads, head_dim=head_dim,
            patch_size=int(cfg.get("patch_size", 2)), in_channels=int(cfg.get("in_channels", 16)),
            out_channels=int(cfg.get("out_channels") or cfg.get("in_channels", 16)),
            context_dim=int(cfg.get("joint_attention_dim", 4096)),
            pooled_dim=int(cfg.get("pooled_projection_dim", 2048)),
            pos_embed_max_size=int(cfg.get("pos_embed_max_size", 96)),
            sample_size=int(cfg.get("sample_size", 128)), qk_norm=qk == "rms_norm",
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )

    @classmethod
    def from_weights(cls, shapes: Mapping[str, tuple], layout: str, origin: str) -> "MMDiTConfig":
        """Detect the configuration from tensor shapes (a single file carries no config)."""
        d = layout == "diffusers"
        blk = "transformer_blocks" if d else "joint_blocks"
        patch_w = shapes["pos_embed.proj.weight" if d else "x_embedder.proj.weight"]
        hidden, in_ch, p = patch_w[0], patch_w[1], patch_w[2]
        pos = shapes["pos_embed.pos_embed" if d else "pos_embed"]
        side = math.isqrt(pos[1])
        if side * side != pos[1]:
            raise MMDiTError(f"{origin}: position table of {pos[1]} entries is not square")
        n = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith(blk + "."))
        qk_key = f"{blk}.0.attn.norm_k.weight" if d else f"{blk}.0.x_block.attn.ln_k.weight"
        head_dim = shapes[qk_key][0] if qk_key in shapes else 64
        dual = tuple(i for i in range(n)
                     if (f"{blk}.{i}.attn2.norm_k.weight" if d else f"{blk}.{i}.x_block.attn2.ln_k.weight")
                     in shapes or (f"{blk}.{i}.attn2.to_q.weight" if d else
                                   f"{blk}.{i}.x_block.attn2.qkv.weight") in shapes)
        final = shapes["proj_out.weight" if d else "final_layer.linear.weight"]
        ctx = shapes["context_embedder.weight"]
        pooled = shapes["time_text_embed.text_embedder.linear_1.weight" if d else "y_embedder.mlp.0.weight"]
        fc1 = shapes[f"{blk}.0.ff.net.0.proj.weight" if d else f"{blk}.0.x_block.mlp.fc1.weight"]
        return cls(num_layers=n, num_heads=hidden // head_dim, head_dim=head_dim, patch_size=p,
                   in_channels=in_ch, out_channels=final[0] // (p * p), context_dim=ctx[1],
                   pooled_dim=pooled[1], pos_embed_max_size=side, qk_norm=qk_key in shapes,
                   dual_attention_layers=dual, mlp_ratio=fc1[0] / hidden,
                   guidance_embed=("time_text_embed.guidance_embedder.linear_1.weight" if d else
                                   "g_embedder.mlp.0.weight") in shapes)


PRESETS = {
    "sd3-medium": MMDiTConfig(num_layers=24, num_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": MMDiTConfig(num_layers=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                                dual_attention_layers=tuple(range(13))),
    "sd3.5-large": MMDiTConfig(num_layers=38, num_heads=38, pos_embed_max_size=192, qk_norm=True),
}
PRESETS["sd3.5-large-turbo"] = PRESETS["sd3.5-large"]
