"""The KL autoencoder shared by SD3 and FLUX.1: config, network, checkpoint layouts, tiling, loader."""
from mmdit_jax.vae.autoencoder import VAE, load_vae
from mmdit_jax.vae.config import PRESETS, VAEConfig, vae_preset

__all__ = ["PRESETS", "VAE", "VAEConfig", "load_vae", "vae_preset"]
