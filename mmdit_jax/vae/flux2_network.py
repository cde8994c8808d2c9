"""FLUX.2's autoencoder as Flax NNX modules, NHWC: the KL encoder and decoder of model.py, quant convs,
the latents' 2x2 patchify and the batch-norm statistics that normalise them.

`encode_latents` gives what diffusers' Flux2Pipeline / Flux2KleinPipeline build from an image: the
posterior mean (the pipelines take the mode, never a sample), patchified so that channel
c * (ph * pw) + i * pw + j holds latent channel c at offset (i, j) of its patch, then
(z - running_mean) / sqrt(running_var + eps). `decode_latents` inverts that and decodes.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mmdit_jax.layers import Buffer
from mmdit_jax.vae.flux2_config import Flux2VAEConfig
from mmdit_jax.vae.network import Conv, Decoder, Encoder


def patchify(z, patch: tuple[int, int]):
    """(B, H, W, C) -> (B, H/ph, W/pw, C*ph*pw), channel-major within a patch as the pipelines pack it."""
    b, h, w, c = z.shape
    ph, pw = patch
    z = z.reshape(b, h // ph, ph, w // pw, pw, c)
    return z.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // ph, w // pw, c * ph * pw)


def unpatchify(z, patch: tuple[int, int]):
    """The inverse of `patchify`."""
    b, h, w, cp = z.shape
    ph, pw = patch
    c = cp // (ph * pw)
    z = z.reshape(b, h, w, c, ph, pw)
    return z.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * ph, w * pw, c)


class BatchNormStats(nnx.Module):
    """The running mean and variance of a frozen, affine-free batch norm over the patchified channels.
    Kept float32 whatever the parameter dtype: they are read, never trained."""

    def __init__(self, channels: int, eps: float):
        meta = dict(sharding_names=("norm",), eager_sharding=False)
        self.running_mean = Buffer(jnp.zeros((channels,), jnp.float32), **meta)
        self.running_var = Buffer(jnp.ones((channels,), jnp.float32), **meta)
        self.eps = eps

    def std(self):
        return jnp.sqrt(self.running_var[...].astype(jnp.float32) + self.eps)

    def normalize(self, z):
        return (z.astype(jnp.float32) - self.running_mean[...].astype(jnp.float32)) / self.std()

    def denormalize(self, z):
        return z.astype(jnp.float32) * self.std() + self.running_mean[...].astype(jnp.float32)


class AutoencoderKLFlux2(nnx.Module):
    """Raw network plus the latent map. The `*_raw` methods work on unpatchified, unnormalised latents
    (B, H/8, W/8, latent_channels) (what tiles go through); the others on the pipelines' latents."""

    def __init__(self, cfg: Flux2VAEConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.encoder = Encoder(cfg.encoder_config, **kw)
        self.decoder = Decoder(cfg.decoder_config, **kw)
        m = cfg.latent_channels
        self.quant_conv = Conv(2 * m, 2 * m, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(m, m, 1, **kw) if cfg.use_post_quant_conv else None
        self.bn = BatchNormStats(cfg.patched_channels, cfg.batch_norm_eps)

    def encode_mean_raw(self, x):
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        # moments are [mean, logvar] on the channel axis; the pipelines use the mean (the mode)
        return h[..., :self.config.latent_channels]

    def decode_raw(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_latents(self, mean):
        """Raw posterior mean -> the pipelines' patchified, normalised latents (float32)."""
        return self.bn.normalize(patchify(mean.astype(jnp.float32), self.config.patch_size))

    def from_latents(self, latents):
        """The pipelines' latents -> raw latents for the decoder (float32)."""
        return unpatchify(self.bn.denormalize(latents), self.config.patch_size)

    def encode_latents(self, x):
        return self.to_latents(self.encode_mean_raw(x))

    def decode_latents(self, latents):
        return self.decode_raw(self.from_latents(latents))  # the convs cast to their own dtype
