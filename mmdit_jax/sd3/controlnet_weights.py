"""SD3 ControlNet checkpoint layouts <-> the internal SD3ControlNet parameter tree.

"diffusers": SD3ControlNetModel's keys. "original": Stability AI's SD3.5-Large ControlNet files (x-only
blocks with fused qkv, `adaLN_modulation.1`, `mlp.fc1`; the embedders and projections under diffusers'
names). Joint-block nets (InstantX) were only ever published with diffusers keys: both layouts name
those the same.
"""
from __future__ import annotations

import dataclasses

from mmdit_jax.io.rules import Entry, Rule, linear, rule
from mmdit_jax.sd3 import weights
from mmdit_jax.sd3.controlnet import SD3ControlNetConfig

TIME_TEXT = "time_text_embed."


def _same_in_both(r: Rule) -> Rule:
    return dataclasses.replace(r, keys={"diffusers": r.keys["diffusers"], "original": r.keys["diffusers"]},
                               swapped_in=())


def _both(path, name, kind="linear"):
    return rule(path, name, name, kind)


def x_block_rules():
    """An x-only block (SD3SingleTransformerBlock) in both layouts."""
    return [*linear("x_block.mod.lin", "norm1.linear", "adaLN_modulation.1"),
            *linear("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], "attn.qkv", reshaped=1),
            *linear("x_block.proj", "attn.to_out.0", "attn.proj"),
            *linear("x_block.mlp.fc1", "ff.net.0.proj", "mlp.fc1"),
            *linear("x_block.mlp.fc2", "ff.net.2", "mlp.fc2")]


def _linear_both(path, name):
    return [_both(f"{path}.kernel", f"{name}.weight"), _both(f"{path}.bias", f"{name}.bias", "vector")]


def top_rules(cfg: SD3ControlNetConfig):
    r = [*_linear_both("t_embedder.in_layer", TIME_TEXT + "timestep_embedder.linear_1"),
         *_linear_both("t_embedder.out_layer", TIME_TEXT + "timestep_embedder.linear_2"),
         *_linear_both("y_embedder.in_layer", TIME_TEXT + "text_embedder.linear_1"),
         *_linear_both("y_embedder.out_layer", TIME_TEXT + "text_embedder.linear_2"),
         _both("control_embedder.kernel", "pos_embed_input.proj.weight", "patch"),
         _both("control_embedder.bias", "pos_embed_input.proj.bias", "vector")]
    if cfg.use_pos_embed:
        r += [_both("x_embedder.kernel", "pos_embed.proj.weight", "patch"),
              _both("x_embedder.bias", "pos_embed.proj.bias", "vector")]
        if cfg.pos_table:
            r.append(_both("pos_embed", "pos_embed.pos_embed", "table"))
    if cfg.joint:
        r += _linear_both("context_embedder", "context_embedder")
    return r


def _path(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


def plan(cfg: SD3ControlNetConfig) -> list[Entry]:
    """Every internal parameter of `SD3ControlNet(cfg)` with its external keys."""
    entries = [Entry(_path(r.path), r) for r in top_rules(cfg)]
    for g, (dual, idx) in enumerate(cfg.groups()):
        if cfg.joint:
            rules = [_same_in_both(r) for r in weights.block_rules(dual, False)
                     + (weights.qk_norm_rules(dual) if cfg.qk_norm else [])]
        else:
            rules = x_block_rules()
        prefixes = {lay: tuple(f"transformer_blocks.{i}." for i in idx) for lay in ("diffusers", "original")}
        entries += [Entry(("groups", g, "blocks") + _path(r.path), r, prefixes) for r in rules]
    prefixes = {lay: tuple(f"controlnet_blocks.{i}." for i in range(cfg.num_layers))
                for lay in ("diffusers", "original")}
    entries += [Entry(("controlnet_blocks", "blocks", "kernel"), _both("kernel", "weight"), prefixes),
                Entry(("controlnet_blocks", "blocks", "bias"), _both("bias", "bias", "vector"), prefixes)]
    return entries


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if "pos_embed_input.proj.weight" not in keys:
        return None
    if "transformer_blocks.0.attn.qkv.weight" in keys:
        return "original"
    return "diffusers"


def config_from_weights(shapes, layout: str, origin: str) -> SD3ControlNetConfig:
    """An SAI SD3.5 ControlNet file's configuration from its shapes (the file carries none): x-only
    blocks, no patch embedding of its own, head dim 64 (SD3's; not recorded in the file)."""
    from mmdit_jax.errors import MMDiTError

    if layout != "original" or "transformer_blocks.0.attn.qkv.weight" not in shapes:
        raise MMDiTError(f"{origin}: only Stability AI's SD3.5 ControlNet single files (x-only blocks) are "
                         "read without a config.json")
    hidden, ch, p = shapes["pos_embed_input.proj.weight"][:3]
    n = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    in_ch = min(16, ch)
    return SD3ControlNetConfig(
        num_layers=n, num_heads=hidden // 64, head_dim=64, patch_size=p, in_channels=in_ch,
        extra_conditioning_channels=ch - in_ch, context_dim=None,
        pooled_dim=shapes[TIME_TEXT + "text_embedder.linear_1.weight"][1],
        mlp_ratio=shapes["transformer_blocks.0.mlp.fc1.weight"][0] / hidden,
        use_pos_embed=False, pos_table=False, force_zeros_for_pooled_projection=False)
