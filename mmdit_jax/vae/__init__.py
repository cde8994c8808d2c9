"""The KL autoencoder shared by SD3 and FLUX.1 (config, network, checkpoint layouts, tiling, loader),
FLUX.2's variant of it (flux2_*.py: 32 latent channels, patchified and batch-norm-normalised latents)
and a parameter-free pixel-space latent map for pixel-space models (small demo models)."""
from mmdit_jax.vae.loader import VAE, load_vae
from mmdit_jax.vae.config import PRESETS, VAEConfig, vae_preset
from mmdit_jax.vae.flux2_loader import Flux2VAE, load_flux2_vae
from mmdit_jax.vae.flux2_config import Flux2VAEConfig
from mmdit_jax.vae.pixel import PixelSpaceConfig, PixelSpaceVAE

__all__ = ["Flux2VAE", "Flux2VAEConfig", "PRESETS", "PixelSpaceConfig", "PixelSpaceVAE", "VAE", "VAEConfig",
           "load_flux2_vae", "load_vae", "vae_preset"]
