"""Registers FLUX.2 with the family registry."""
from mmdit_jax.families import Family, register
from mmdit_jax.flux2 import weights
from mmdit_jax.flux2.config import PRESETS, Flux2Config
from mmdit_jax.flux2.model import Flux2

FLUX2 = register(Family(
    name="flux2",
    diffusers_class="Flux2Transformer2DModel",
    presets=PRESETS,
    config_from_diffusers=Flux2Config.from_diffusers,
    config_from_weights=Flux2Config.from_weights,
    build=Flux2,
    plan=weights.plan,
    detect_layout=weights.detect_layout,
))
