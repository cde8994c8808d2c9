"""mmdit-jax: SD3, SD3.5 and FLUX.1 (the MMDiT family) in JAX/Flax, with reference parity."""
from mmdit_jax.attention import attention, attention_backend
from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import preset
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.sampling import Pipeline
from mmdit_jax.sd3.config import MMDiTConfig
from mmdit_jax.text import load_text_encoders
from mmdit_jax.transformer import Transformer, count_params, load_transformer, save_transformer
from mmdit_jax.controlnet import ControlNet, load_controlnet
from mmdit_jax import controlnet  # mj.controlnet: several nets at once, the registry
from mmdit_jax.vae import VAE, VAEConfig, load_vae
from mmdit_jax import lora  # mj.lora: adapters, merge, LoRA files

__version__ = "0.1.0"

__all__ = ["ControlNet", "FluxConfig", "MMDiTConfig", "MMDiTError", "Pipeline", "Transformer", "VAE", "VAEConfig",
           "attention", "attention_backend", "controlnet", "count_params", "load_controlnet", "load_text_encoders",
           "load_transformer", "load_vae", "lora", "preset", "save_transformer"]
