"""KL-VAE configuration (SD3 and FLUX.1 share the network; they differ only in latent scale/shift)."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import ByFamily


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per level; the decoder has one more
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad:
            raise MMDiTError(f"VAE block_out_channels {self.block_out_channels} must be non-empty "
                             f"multiples of norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction: one stride-2 conv per level except the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    def with_family(self, family: str) -> "VAEConfig":
        """The same network with `family`'s latent scale and shift."""
        scale, shift = family_scale_shift(family)
        return dataclasses.replace(self, scaling_factor=scale, shift_factor=shift)

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "VAEConfig":
        """From an AutoencoderKL config.json (diffusers' defaults where a key is absent)."""
        cls_name = cfg.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise MMDiTError(f"{origin}: expected an AutoencoderKL config, found {cls_name!r}")
        blocks = tuple(cfg.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = cfg.get(key, (want,) * len(blocks))
            if len(kinds) != len(blocks) or any(k != want for k in kinds):
                raise MMDiTError(f"{origin}: {key} {kinds} not supported (expected {want} per level)")
        if cfg.get("act_fn", "silu") != "silu":
            raise MMDiTError(f"{origin}: act_fn {cfg['act_fn']!r} not supported (only silu)")
        shift = cfg.get("shift_factor")
        try:
            return cls(block_out_channels=blocks,
                       layers_per_block=int(cfg.get("layers_per_block", 1)),
                       in_channels=int(cfg.get("in_channels", 3)),
                       out_channels=int(cfg.get("out_channels", 3)),
                       latent_channels=int(cfg.get("latent_channels", 4)),
                       norm_num_groups=int(cfg.get("norm_num_groups", 32)),
                       scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
                       shift_factor=float(shift) if shift is not None else 0.0,
                       mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
                       use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                       use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)))
        except (TypeError, ValueError) as e:
            if isinstance(e, MMDiTError):
                raise
            raise MMDiTError(f"{origin}: bad AutoencoderKL config ({e})") from None

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n,
                "block_out_channels": list(self.block_out_channels),
                "layers_per_block": self.layers_per_block, "act_fn": "silu",
                "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "mid_block_add_attention": self.mid_block_add_attention,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv}


# Latent normalisation of the released VAEs: latent = (posterior mean - shift) * scale (`Family.vae`).
FAMILY_SCALE_SHIFT = ByFamily(lambda fam: (fam.vae.scale, fam.vae.shift))


def family_scale_shift(family: str) -> tuple[float, float]:
    if family not in FAMILY_SCALE_SHIFT:
        raise MMDiTError(f"unknown VAE family {family!r}; known: {sorted(FAMILY_SCALE_SHIFT)}")
    return FAMILY_SCALE_SHIFT[family]


PRESETS = ByFamily(lambda fam: VAEConfig().with_family(fam.name))


def vae_preset(name: str) -> VAEConfig:
    if name not in PRESETS:
        raise MMDiTError(f"unknown VAE preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
