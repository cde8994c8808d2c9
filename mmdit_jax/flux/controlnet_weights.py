"""FLUX ControlNet checkpoint layout (diffusers' FluxControlNetModel) <-> the internal FluxControlNet tree.

The shared parts reuse the base's rules (flux/weights.py), so their "original" side carries BFL names;
the ControlNet's own parts have diffusers names on both sides. Only the diffusers layout is detected:
diffusers reads no other FLUX ControlNet file (its single-file loader has no FLUX ControlNet converter).
"""
from __future__ import annotations

from mmdit_jax.flux import weights
from mmdit_jax.flux.controlnet import HINT_STAGES, FluxControlNetConfig
from mmdit_jax.io.rules import Entry, rule


def _both(path, name, kind="linear"):
    return rule(path, name, name, kind)


def _linear(path, name):
    return [_both(f"{path}.kernel", f"{name}.weight"), _both(f"{path}.bias", f"{name}.bias", "vector")]


def _conv(path, name):
    return [_both(f"{path}.kernel", f"{name}.weight", "conv"), _both(f"{path}.bias", f"{name}.bias", "vector")]


def control_rules(cfg: FluxControlNetConfig):
    r = _linear("control_embedder", "controlnet_x_embedder")
    if cfg.union:
        r.append(_both("mode_embedder", "controlnet_mode_embedder.weight", "vector"))
    if cfg.hint:
        r += _conv("hint_block.conv_in", "input_hint_block.conv_in")
        for j in range(2 * HINT_STAGES):
            r += _conv(f"hint_block.convs.{j}", f"input_hint_block.blocks.{j}")
        r += _conv("hint_block.conv_out", "input_hint_block.conv_out")
    return r


def _path(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in s.strip(".").split("."))


def plan(cfg: FluxControlNetConfig) -> list[Entry]:
    """Every internal parameter of `FluxControlNet(cfg)` with its external keys."""
    bcfg = cfg.block_config()
    top = [r for r in weights.top_rules(bcfg) if not r.path.startswith("final_layer.")] + control_rules(cfg)
    entries = [Entry(_path(r.path), r) for r in top]
    stacks = [("double_blocks", weights.double_block_rules(bcfg), cfg.depth, "transformer_blocks", "double_blocks"),
              ("single_blocks", weights.single_block_rules(bcfg), cfg.depth_single, "single_transformer_blocks",
               "single_blocks"),
              ("controlnet_blocks", [_both("kernel", "weight"), _both("bias", "bias", "vector")],
               cfg.depth, "controlnet_blocks", "controlnet_blocks"),
              ("controlnet_single_blocks", [_both("kernel", "weight"), _both("bias", "bias", "vector")],
               cfg.depth_single, "controlnet_single_blocks", "controlnet_single_blocks")]
    for name, rules, n, d_prefix, o_prefix in stacks:
        if not n:
            continue
        prefixes = {"diffusers": tuple(f"{d_prefix}.{i}." for i in range(n)),
                    "original": tuple(f"{o_prefix}.{i}." for i in range(n))}
        entries += [Entry((name, "blocks") + _path(r.path), r, prefixes) for r in rules]
    return entries


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if "controlnet_x_embedder.weight" in keys and "x_embedder.weight" in keys:
        return "diffusers"
    return None


def config_from_weights(shapes, layout, origin):
    from mmdit_jax.errors import MMDiTError

    raise MMDiTError(f"{origin}: a FLUX ControlNet needs its config.json (diffusers folder); diffusers "
                     "reads no single-file FLUX ControlNet either")
