"""Registers FLUX.1 with the family registry."""
from mmdit_jax.families import Family, register
from mmdit_jax.flux import weights
from mmdit_jax.flux.config import PRESETS, FluxConfig
from mmdit_jax.flux.model import Flux

FLUX = register(Family(
    name="flux",
    diffusers_class="FluxTransformer2DModel",
    presets=PRESETS,
    config_from_diffusers=FluxConfig.from_diffusers,
    config_from_weights=FluxConfig.from_weights,
    build=Flux,
    plan=weights.plan,
    detect_layout=weights.detect_layout,
))
