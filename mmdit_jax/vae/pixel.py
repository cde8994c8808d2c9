"""A parameter-free "VAE" for pixel-space models: space-to-depth by `factor`, then shift and scale.

images (B, H, W, C) in [-1, 1] -> latents (B, H/f, W/f, C*f*f), channel layout (dy, dx, c) with c
fastest; decode is the exact inverse (up to float rounding of the affine map). It offers the interface
of `mmdit_jax.vae.VAE` (config with latent_channels / downsample_factor / scaling_factor / shift_factor,
params, pure encode_apply / decode_apply, jitted encode / decode and the tiled variants) so samplers
and trainers need no special case. A folder whose config.json says `"_class_name": "PixelSpaceVAE"`
loads through `load_vae`; no weights file is needed.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from mmdit_jax.errors import MMDiTError
from mmdit_jax.vae.shapes import check_nhwc

CLASS_NAME = "PixelSpaceVAE"


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig:
    factor: int = 2
    in_channels: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        if int(self.factor) < 1 or int(self.in_channels) < 1:
            raise MMDiTError(f"PixelSpaceVAE factor ({self.factor}) and in_channels ({self.in_channels}) "
                             "must be positive integers")
        if not self.scaling_factor:
            raise MMDiTError("PixelSpaceVAE scaling_factor must be non-zero (decode divides by it)")

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.factor ** 2

    @property
    def downsample_factor(self) -> int:
        return self.factor

    def to_diffusers(self) -> dict:
        """config.json content (diffusers has no such class: only our loaders read it)."""
        return {"_class_name": CLASS_NAME, "factor": self.factor, "in_channels": self.in_channels,
                "latent_channels": self.latent_channels, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor}

    @classmethod
    def from_diffusers(cls, cfg: Mapping, origin: str = "config.json") -> "PixelSpaceConfig":
        if cfg.get("_class_name") != CLASS_NAME:
            raise MMDiTError(f"{origin}: expected a {CLASS_NAME} config, found {cfg.get('_class_name')!r}")
        try:
            out = cls(factor=int(cfg.get("factor", 2)), in_channels=int(cfg.get("in_channels", 3)),
                      scaling_factor=float(cfg.get("scaling_factor", 1.0)),
                      shift_factor=float(cfg.get("shift_factor", 0.0)))
        except (TypeError, ValueError) as e:
            raise MMDiTError(f"{origin}: bad {CLASS_NAME} config ({e})") from None
        if "latent_channels" in cfg and int(cfg["latent_channels"]) != out.latent_channels:
            raise MMDiTError(f"{origin}: latent_channels {cfg['latent_channels']} does not match "
                             f"in_channels * factor^2 = {out.latent_channels}")
        return out


def space_to_depth(x, f: int):
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(z, f: int):
    b, h, w, fc = z.shape
    c = fc // (f * f)
    z = z.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h * f, w * f, c)


class PixelSpaceVAE:
    """Same surface as `VAE`; `params` is an empty dict (nothing to train, save or shard)."""

    def __init__(self, config: PixelSpaceConfig, params=None, dtype=jnp.float32):
        from mmdit_jax.dtypes import parse_dtype

        self.config = config
        self.dtype = parse_dtype(dtype)
        self.params = {} if params is None else params
        self._encode = jax.jit(self.encode_apply)
        self._decode = jax.jit(self.decode_apply)

    @classmethod
    def init(cls, config: PixelSpaceConfig, seed: int = 0, dtype="float32") -> "PixelSpaceVAE":
        del seed  # nothing random
        return cls(config, {}, dtype)

    def encode_apply(self, params, images):
        del params
        c = self.config
        z = space_to_depth(images.astype(jnp.float32), c.factor)
        return (z - c.shift_factor) * c.scaling_factor

    def decode_apply(self, params, latents):
        del params
        c = self.config
        return depth_to_space(latents.astype(jnp.float32) / c.scaling_factor + c.shift_factor, c.factor)

    def encode(self, images):
        check_nhwc(images, self.config.in_channels, "images", self.config.factor)
        return self._encode(self.params, images)

    def decode(self, latents):
        check_nhwc(latents, self.config.latent_channels, "latents", 1)
        return self._decode(self.params, latents)

    # pointwise per block of pixels: tiling changes nothing
    def encode_tiled(self, images, tile_size: int = 512, overlap: float = 0.25):
        return self.encode(images)

    def decode_tiled(self, latents, tile_size: int = 512, overlap: float = 0.25):
        return self.decode(latents)
