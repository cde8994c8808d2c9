"""The KL autoencoder shared by SD3 and FLUX.1 (config, network, checkpoint layouts, tiling, loader) and a
parameter-free pixel-space latent map for pixel-space models (small demo models)."""
from mmdit_jax.vae.autoencoder import VAE, load_vae
from mmdit_jax.vae.config import PRESETS, VAEConfig, vae_preset
from mmdit_jax.vae.pixel import PixelSpaceConfig, PixelSpaceVAE

__all__ = ["PRESETS", "PixelSpaceConfig", "PixelSpaceVAE", "VAE", "VAEConfig", "load_vae", "vae_preset"]
