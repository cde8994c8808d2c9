"""FLUX.1 configuration, presets, and the two ways of learning it from a checkpoint."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from mmdit_jax.errors import MMDiTError


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # 16 latent channels packed 2x2 as (c, ph, pw)
    out_channels: int = 64
    num_heads: int = 24
    head_dim: int = 128
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # T5-XXL width
    pooled_dim: int = 768  # CLIP-L pooled width
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE split of head_dim over (text/index, row, col)
    theta: int = 10000
    guidance_embed: bool = True  # dev: guidance is an input; schnell: no guidance embedder
    qkv_bias: bool = True
    family: str = "flux"

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise MMDiTError(f"axes_dim {self.axes_dim} must be even sizes summing to head_dim "
                             f"{self.head_dim} (RoPE rotates pairs of channels)")
        if self.in_channels % 4 or self.out_channels % 4:
            raise MMDiTError(f"in/out channels {self.in_channels}/{self.out_channels} must be multiples "
                             "of 4 (2x2-packed latents)")
        if self.depth < 0 or self.depth_single < 0:
            raise MMDiTError("depth and depth_single must be non-negative")
        if self.mlp_hidden % self.hidden_size:
            raise MMDiTError(f"mlp_ratio {self.mlp_ratio} must make the MLP width a multiple of the hidden "
                             f"size {self.hidden_size} (single blocks keep their MLP in chunks of that width)")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    # diffusers FluxTransformer2DModel config.json <-> this config
    def to_diffusers(self) -> dict:
        # diffusers hard-codes these; a config that differs has no diffusers equivalent
        if self.mlp_ratio != 4.0 or self.theta != 10000 or not self.qkv_bias:
            raise MMDiTError("FluxTransformer2DModel only represents mlp_ratio 4, theta 10000 and "
                             f"qkv bias; this config has {self.mlp_ratio}, {self.theta}, {self.qkv_bias}")
        return {
            "_class_name": "FluxTransformer2DModel", "patch_size": 1,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "num_layers": self.depth, "num_single_layers": self.depth_single,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim, "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance_embed, "axes_dims_rope": list(self.axes_dim),
        }

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "FluxConfig":
        # diffusers' FLUX takes already-packed tokens (patch_size 1); other values are not FLUX.1
        if int(cfg.get("patch_size", 1)) != 1:
            raise MMDiTError(f"{origin}: patch_size={cfg['patch_size']} is not supported (FLUX.1 uses 1 "
                             "on 2x2-packed latents)")
        in_ch = int(cfg.get("in_channels", 64))
        return cls(
            in_channels=in_ch, out_channels=int(cfg.get("out_channels") or in_ch),
            num_heads=int(cfg.get("num_attention_heads", 24)), head_dim=int(cfg.get("attention_head_dim", 128)),
            depth=int(cfg.get("num_layers", 19)), depth_single=int(cfg.get("num_single_layers", 38)),
            context_dim=int(cfg.get("joint_attention_dim", 4096)),
            pooled_dim=int(cfg.get("pooled_projection_dim", 768)),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
            axes_dim=tuple(cfg.get("axes_dims_rope") or (16, 56, 56)),
        )

    @classmethod
    def from_weights(cls, shapes: Mapping[str, tuple], layout: str, origin: str) -> "FluxConfig":
        """Detect the configuration from tensor shapes (a single file carries no config)."""
        k = _KEYS[layout]
        hidden, in_ch = shapes[k["img_in"]]
        norm = k["q_norm"] if k["q_norm"] in shapes else k["single_q_norm"]
        head_dim = shapes[norm][0]
        if hidden % head_dim:
            raise MMDiTError(f"{origin}: hidden size {hidden} is not a multiple of head dim {head_dim}")
        # The RoPE split is not stored; FLUX.1 gives 1/8 of the head to the index axis and 7/16 to each
        # spatial axis, which is what a file of another head size most plausibly continues.
        if head_dim % 32:
            raise MMDiTError(f"{origin}: cannot infer the RoPE axes for head dim {head_dim}; load it "
                             "from a diffusers folder whose config.json names axes_dims_rope")
        axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
        depth = _count(shapes, k["double"])
        depth_single = _count(shapes, k["single"])
        mlp = shapes[k["single_mlp_out"]][1] - hidden if depth_single else shapes[k["mlp"]][0]
        return cls(
            in_channels=in_ch, out_channels=shapes[k["final"]][0], num_heads=hidden // head_dim,
            head_dim=head_dim, depth=depth, depth_single=depth_single, mlp_ratio=mlp / hidden,
            context_dim=shapes[k["txt_in"]][1], pooled_dim=shapes[k["vector_in"]][1], axes_dim=axes,
            guidance_embed=k["guidance"] in shapes, qkv_bias=depth == 0 or k["qkv_bias"] in shapes,
        )


def _count(shapes, prefix: str) -> int:
    idx = {int(key[len(prefix):].split(".")[0]) for key in shapes if key.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# The few keys config detection reads, per layout.
_KEYS = {
    "original": dict(img_in="img_in.weight", txt_in="txt_in.weight", vector_in="vector_in.in_layer.weight",
                     guidance="guidance_in.in_layer.weight", final="final_layer.linear.weight",
                     double="double_blocks.", single="single_blocks.",
                     q_norm="double_blocks.0.img_attn.norm.query_norm.scale",
                     single_q_norm="single_blocks.0.norm.query_norm.scale",
                     qkv_bias="double_blocks.0.img_attn.qkv.bias", mlp="double_blocks.0.img_mlp.0.weight",
                     single_mlp_out="single_blocks.0.linear2.weight"),
    "diffusers": dict(img_in="x_embedder.weight", txt_in="context_embedder.weight",
                      vector_in="time_text_embed.text_embedder.linear_1.weight",
                      guidance="time_text_embed.guidance_embedder.linear_1.weight", final="proj_out.weight",
                      double="transformer_blocks.", single="single_transformer_blocks.",
                      q_norm="transformer_blocks.0.attn.norm_q.weight",
                      single_q_norm="single_transformer_blocks.0.attn.norm_q.weight",
                      qkv_bias="transformer_blocks.0.attn.to_q.bias",
                      mlp="transformer_blocks.0.ff.net.0.proj.weight",
                      single_mlp_out="single_transformer_blocks.0.proj_out.weight"),
}

PRESETS = {
    "flux-dev": FluxConfig(guidance_embed=True),
    "flux-schnell": FluxConfig(guidance_embed=False),
}
