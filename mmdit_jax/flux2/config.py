"""FLUX.2 configuration, presets, and the two ways of learning it from a checkpoint."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from mmdit_jax.errors import MMDiTError


@dataclasses.dataclass(frozen=True)
class Flux2Config:
    in_channels: int = 128  # 32 VAE channels patchified 2x2
    out_channels: int = 128
    num_heads: int = 48
    head_dim: int = 128
    depth: int = 8  # double-stream blocks
    depth_single: int = 48  # single-stream blocks
    mlp_ratio: float = 3.0  # SwiGLU hidden width / model width
    context_dim: int = 15360  # 3 stacked text-encoder hidden states
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE split of head_dim over (T, H, W, L)
    theta: int = 2000
    time_channels: int = 256  # timestep / guidance sinusoid width
    guidance_embed: bool = True  # dev: guidance is an input; klein: no guidance embedder
    family: str = "flux2"

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if len(self.axes_dim) != 4:
            raise MMDiTError(f"axes_dim {self.axes_dim}: FLUX.2 positions have 4 axes (T, H, W, L)")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise MMDiTError(f"axes_dim {self.axes_dim} must be even sizes summing to head_dim "
                             f"{self.head_dim} (RoPE rotates pairs of channels)")
        if min(self.in_channels, self.out_channels, self.num_heads, self.head_dim, self.context_dim,
               self.time_channels) <= 0:
            raise MMDiTError("channels, heads, head_dim, context_dim and time_channels must be positive")
        if self.depth < 0 or self.depth_single < 0:
            raise MMDiTError("depth and depth_single must be non-negative")
        if self.mlp_ratio <= 0 or self.mlp_hidden % self.hidden_size:
            raise MMDiTError(f"mlp_ratio {self.mlp_ratio} must make the MLP width a positive multiple of "
                             f"the hidden size {self.hidden_size} (single blocks keep their MLP in chunks "
                             "of that width)")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    # diffusers Flux2Transformer2DModel config.json <-> this config
    def to_diffusers(self) -> dict:
        return {
            "_class_name": "Flux2Transformer2DModel", "patch_size": 1,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "num_layers": self.depth, "num_single_layers": self.depth_single,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim, "timestep_guidance_channels": self.time_channels,
            "mlp_ratio": self.mlp_ratio, "axes_dims_rope": list(self.axes_dim), "rope_theta": self.theta,
            "eps": 1e-6, "guidance_embeds": self.guidance_embed,
        }

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "Flux2Config":
        # the pipelines hand the model already-patchified tokens (patch_size 1); 1e-6 is the only eps
        # the released models (and this implementation) use
        if int(cfg.get("patch_size", 1)) != 1:
            raise MMDiTError(f"{origin}: patch_size={cfg['patch_size']} is not supported (FLUX.2 uses 1 "
                             "on 2x2-patchified latents)")
        if float(cfg.get("eps", 1e-6)) != 1e-6:
            raise MMDiTError(f"{origin}: eps={cfg['eps']} is not supported (FLUX.2 uses 1e-6)")
        in_ch = int(cfg.get("in_channels", 128))
        return cls(
            in_channels=in_ch, out_channels=int(cfg.get("out_channels") or in_ch),
            num_heads=int(cfg.get("num_attention_heads", 48)), head_dim=int(cfg.get("attention_head_dim", 128)),
            depth=int(cfg.get("num_layers", 8)), depth_single=int(cfg.get("num_single_layers", 48)),
            mlp_ratio=float(cfg.get("mlp_ratio", 3.0)), context_dim=int(cfg.get("joint_attention_dim", 15360)),
            axes_dim=tuple(cfg.get("axes_dims_rope") or (32, 32, 32, 32)),
            theta=int(cfg.get("rope_theta", 2000)),
            time_channels=int(cfg.get("timestep_guidance_channels", 256)),
            guidance_embed=bool(cfg.get("guidance_embeds", True)),
        )

    @classmethod
    def from_weights(cls, shapes: Mapping[str, tuple], layout: str, origin: str) -> "Flux2Config":
        """Detect the configuration from tensor shapes (a single file carries no config)."""
        k = _KEYS[layout]
        hidden, in_ch = shapes[k["img_in"]]
        depth, depth_single = _count(shapes, k["double"]), _count(shapes, k["single"])
        norm = k["q_norm"] if depth else k["single_q_norm"]
        head_dim = shapes[norm][0]
        if hidden % head_dim:
            raise MMDiTError(f"{origin}: hidden size {hidden} is not a multiple of head dim {head_dim}")
        # The RoPE split is not stored; every released FLUX.2 gives each of the 4 axes a quarter of the head.
        if head_dim % 8:
            raise MMDiTError(f"{origin}: cannot infer the RoPE axes for head dim {head_dim}; load it "
                             "from a diffusers folder whose config.json names axes_dims_rope")
        # the double blocks' SwiGLU input holds gate and value halves
        mlp = shapes[k["mlp_in"]][0] // 2 if depth else shapes[k["single_out"]][1] - hidden
        time_in = shapes[k["time_in"]]
        return cls(
            in_channels=in_ch, out_channels=shapes[k["final"]][0], num_heads=hidden // head_dim,
            head_dim=head_dim, depth=depth, depth_single=depth_single, mlp_ratio=mlp / hidden,
            context_dim=shapes[k["txt_in"]][1], axes_dim=(head_dim // 4,) * 4,
            time_channels=time_in[1], guidance_embed=k["guidance"] in shapes,
        )


def _count(shapes, prefix: str) -> int:
    idx = {int(key[len(prefix):].split(".")[0]) for key in shapes if key.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# The few keys config detection reads, per layout.
_KEYS = {
    "original": dict(img_in="img_in.weight", txt_in="txt_in.weight", time_in="time_in.in_layer.weight",
                     guidance="guidance_in.in_layer.weight", final="final_layer.linear.weight",
                     double="double_blocks.", single="single_blocks.",
                     q_norm="double_blocks.0.img_attn.norm.query_norm.scale",
                     single_q_norm="single_blocks.0.norm.query_norm.scale",
                     mlp_in="double_blocks.0.img_mlp.0.weight", single_out="single_blocks.0.linear2.weight"),
    "diffusers": dict(img_in="x_embedder.weight", txt_in="context_embedder.weight",
                      time_in="time_guidance_embed.timestep_embedder.linear_1.weight",
                      guidance="time_guidance_embed.guidance_embedder.linear_1.weight", final="proj_out.weight",
                      double="transformer_blocks.", single="single_transformer_blocks.",
                      q_norm="transformer_blocks.0.attn.norm_q.weight",
                      single_q_norm="single_transformer_blocks.0.attn.norm_q.weight",
                      mlp_in="transformer_blocks.0.ff.linear_in.weight",
                      single_out="single_transformer_blocks.0.attn.to_out.weight"),
}

PRESETS = {
    # diffusers' Flux2Transformer2DModel defaults are FLUX.2-dev (SPEC.md; 8 + 48 blocks, 48 x 128, 15360)
    "flux2-dev": Flux2Config(),
    # klein 4B / 9B (base and distilled share these): InvokeAI's FLUX.2 presets
    # (invokeai/backend/flux2, `_flux2_transformer_params`), matching the transformer/config.json of
    # black-forest-labs/FLUX.2-klein-4B / -9B as quoted by mflux and others: text width 3 x Qwen3
    # hidden (2560 for Qwen3-4B, 4096 for Qwen3-8B), no guidance embedder
    "flux2-klein-4b": Flux2Config(num_heads=24, depth=5, depth_single=20, context_dim=7680,
                                  guidance_embed=False),
    "flux2-klein-9b": Flux2Config(num_heads=32, depth=8, depth_single=24, context_dim=12288,
                                  guidance_embed=False),
}
