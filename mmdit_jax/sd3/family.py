"""Registers SD3 / SD3.5 with the family registry."""
from mmdit_jax.families import Family, register
from mmdit_jax.sd3 import weights
from mmdit_jax.sd3.config import PRESETS, MMDiTConfig
from mmdit_jax.sd3.model import MMDiT

SD3 = register(Family(
    name="sd3",
    diffusers_class="SD3Transformer2DModel",
    presets=PRESETS,
    config_from_diffusers=MMDiTConfig.from_diffusers,
    config_from_weights=MMDiTConfig.from_weights,
    build=MMDiT,
    plan=weights.plan,
    detect_layout=weights.detect_layout,
))
