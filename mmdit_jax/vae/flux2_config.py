"""Configuration of FLUX.2's autoencoder (diffusers' AutoencoderKLFlux2, BFL's flux2 AutoEncoder).

The network is the KL autoencoder of SD3 / FLUX.1 (32 latent channels, quant convs on, the decoder's
widths may differ from the encoder's); on top of it the latents are patchified (2x2 -> 128 channels at
1/16 of the image) and normalised with a batch norm's running statistics instead of a scale and shift.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from mmdit_jax.errors import MMDiTError
from mmdit_jax.vae.config import VAEConfig

CLASS_NAME = "AutoencoderKLFlux2"


@dataclasses.dataclass(frozen=True)
class Flux2VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: the encoder's
    layers_per_block: int = 2  # encoder resnets per level; the decoder has one more
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        dec = self.decoder_block_out_channels
        object.__setattr__(self, "decoder_block_out_channels",
                           self.block_out_channels if dec is None else tuple(int(c) for c in dec))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.decoder_block_out_channels) != len(self.block_out_channels):
            # one stride-2 step per level: unequal level counts would not invert the encoder's scale
            raise MMDiTError(f"FLUX.2 VAE decoder_block_out_channels {self.decoder_block_out_channels} "
                             f"must have as many levels as block_out_channels {self.block_out_channels}")
        if len(self.patch_size) != 2 or self.patch_size[0] != self.patch_size[1] or self.patch_size[0] < 1:
            # the pipelines patchify 2x2; square patches keep one downsample factor per side
            raise MMDiTError(f"FLUX.2 VAE patch_size {self.patch_size} must be square, e.g. (2, 2)")
        if not self.batch_norm_eps > 0:
            raise MMDiTError(f"FLUX.2 VAE batch_norm_eps {self.batch_norm_eps} must be positive")
        _ = (self.encoder_config, self.decoder_config)  # the KL network validates its own fields

    def _network(self, blocks) -> VAEConfig:
        return VAEConfig(block_out_channels=blocks, layers_per_block=self.layers_per_block,
                         in_channels=self.in_channels, out_channels=self.out_channels,
                         latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                         scaling_factor=1.0, shift_factor=0.0,
                         mid_block_add_attention=self.mid_block_add_attention,
                         use_quant_conv=False, use_post_quant_conv=False)

    @property
    def encoder_config(self) -> VAEConfig:
        """The KL network config the encoder is built from (quant convs are held by the FLUX.2 model)."""
        return self._network(self.block_out_channels)

    @property
    def decoder_config(self) -> VAEConfig:
        return self._network(self.decoder_block_out_channels)

    @property
    def network_factor(self) -> int:
        """Image pixels per latent pixel before patchifying (8 for the released VAE)."""
        return self.encoder_config.downsample_factor

    @property
    def downsample_factor(self) -> int:
        """Image pixels per patchified latent pixel (16 for the released VAE)."""
        return self.network_factor * self.patch_size[0]

    @property
    def patched_channels(self) -> int:
        """Channels of the patchified latents and of the batch-norm statistics (128 released)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "Flux2VAEConfig":
        """From an AutoencoderKLFlux2 config.json (diffusers' defaults where a key is absent)."""
        cls_name = cfg.get("_class_name", CLASS_NAME)
        if cls_name != CLASS_NAME:
            raise MMDiTError(f"{origin}: expected an {CLASS_NAME} config, found {cls_name!r}")
        blocks = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = cfg.get(key, (want,) * len(blocks))
            if len(kinds) != len(blocks) or any(k != want for k in kinds):
                raise MMDiTError(f"{origin}: {key} {kinds} not supported (expected {want} per level)")
        if cfg.get("act_fn", "silu") != "silu":
            raise MMDiTError(f"{origin}: act_fn {cfg['act_fn']!r} not supported (only silu)")
        try:
            return cls(block_out_channels=blocks,
                       decoder_block_out_channels=cfg.get("decoder_block_out_channels"),
                       layers_per_block=int(cfg.get("layers_per_block", 2)),
                       in_channels=int(cfg.get("in_channels", 3)),
                       out_channels=int(cfg.get("out_channels", 3)),
                       latent_channels=int(cfg.get("latent_channels", 32)),
                       norm_num_groups=int(cfg.get("norm_num_groups", 32)),
                       mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
                       use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                       use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                       batch_norm_eps=float(cfg.get("batch_norm_eps", 1e-4)),
                       patch_size=tuple(cfg.get("patch_size", (2, 2))))
        except (TypeError, ValueError) as e:
            if isinstance(e, MMDiTError):
                raise
            raise MMDiTError(f"{origin}: bad {CLASS_NAME} config ({e})") from None

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": CLASS_NAME, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n,
                "block_out_channels": list(self.block_out_channels),
                "decoder_block_out_channels": list(self.decoder_block_out_channels),
                "layers_per_block": self.layers_per_block, "act_fn": "silu",
                "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
                "mid_block_add_attention": self.mid_block_add_attention,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
                "batch_norm_eps": self.batch_norm_eps, "patch_size": list(self.patch_size)}
