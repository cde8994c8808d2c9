"""Registry of transformer families (SD3, FLUX): how to detect, configure, build and map each one."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Mapping

from mmdit_jax.errors import MMDiTError

# Modules that call `register` on import; a new family adds its module here.
FAMILY_MODULES = ("mmdit_jax.sd3.family", "mmdit_jax.flux.family", "mmdit_jax.flux2.family")
# Prefixes single-file checkpoints put before the network's keys (SAI, ComfyUI).
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    diffusers_class: str  # config.json `_class_name`
    presets: Mapping[str, object]
    config_from_diffusers: Callable  # (config dict, origin) -> config
    config_from_weights: Callable  # (shapes dict, layout, origin) -> config
    build: Callable  # (config, *, param_dtype, rngs) -> nnx.Module
    plan: Callable  # config -> list[rules.Entry]
    detect_layout: Callable  # keys -> "diffusers" | "original" | None


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, Family]:
    for m in FAMILY_MODULES:
        importlib.import_module(m)
    return _REGISTRY


def family_of_config(config) -> Family:
    name = getattr(config, "family", None)
    fams = families()
    if name not in fams:
        raise MMDiTError(f"unknown model family {name!r}; known: {sorted(fams)}")
    return fams[name]


def preset(name: str):
    """A released model's configuration by preset name (e.g. "sd3.5-medium", "flux-dev")."""
    for fam in families().values():
        if name in fam.presets:
            return fam.presets[name]
    known = sorted(p for f in families().values() for p in f.presets)
    raise MMDiTError(f"unknown preset {name!r}; known presets: {', '.join(known)}")


def family_of_diffusers_config(config: dict, origin: str) -> Family:
    """The family whose diffusers class a config.json names."""
    fams = families()
    cls = config.get("_class_name")
    match = [f for f in fams.values() if f.diffusers_class == cls]
    if not match:
        raise MMDiTError(f"{origin}: unknown model class {cls!r} in config.json; supported: "
                         f"{', '.join(f.diffusers_class for f in fams.values())}")
    return match[0]


def detect(tensors: Mapping, config: dict | None, origin: str):
    """(family, layout, tensor view with any single-file prefix removed)."""
    from mmdit_jax.io.sources import PrefixView

    fams = families()
    if config is not None:
        fam = family_of_diffusers_config(config, origin)
        layout = fam.detect_layout(list(tensors))
        if layout != "diffusers":
            raise MMDiTError(f"{origin}: weights are not in the diffusers {fam.diffusers_class} key layout")
        return fam, layout, tensors
    keys = list(tensors)
    for prefix in SINGLE_FILE_PREFIXES:
        view = PrefixView(tensors, prefix) if prefix else tensors
        vkeys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if not vkeys:
            continue
        for fam in fams.values():
            layout = fam.detect_layout(vkeys)
            if layout is not None:
                return fam, layout, view
    raise MMDiTError(f"{origin}: cannot tell the model family from its keys (not an SD3 or FLUX "
                     f"transformer in diffusers, SAI/BFL or ComfyUI layout); first keys: "
                     f"{', '.join(keys[:5])}")
