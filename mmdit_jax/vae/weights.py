"""VAE checkpoint layouts <-> the internal parameter tree, and config detection for single files.

Layouts: "diffusers" (AutoencoderKL state dict) and "original", the LDM layout of SD3 single files
(under `first_stage_model.`) and of BFL's `ae.safetensors` (bare keys). The LDM layout numbers decoder
levels by resolution like the encoder's, 0 = full resolution, run last (`decoder.up.{i}` is diffusers'
`up_blocks.{n-1-i}`), and keeps the mid-block attention projections as 1x1 convs.
"""
from __future__ import annotations

import re
from typing import Mapping

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.rules import Entry, rule, tree_path
from mmdit_jax.vae.config import VAEConfig

# Prefixes that single files put before the VAE's keys, tried in order (SD3 / SD3.5 single files use
# the first; diffusers' single-file loader also knows "vae.").
SINGLE_FILE_PREFIXES = ("first_stage_model.", "vae.", "")


def _conv(path, d, o):
    return [rule(f"{path}.kernel", d + ".weight", o + ".weight", "conv"),
            rule(f"{path}.bias", d + ".bias", o + ".bias", "vector")]


def _norm(path, d, o):
    return [rule(f"{path}.scale", d + ".weight", o + ".weight", "vector"),
            rule(f"{path}.bias", d + ".bias", o + ".bias", "vector")]


def _attn_proj(path, d, o):
    return [rule(f"{path}.kernel", d + ".weight", o + ".weight",
                 {"diffusers": "linear", "original": "pointwise"}),
            rule(f"{path}.bias", d + ".bias", o + ".bias", "vector")]


def _resnet(path, d, o, has_shortcut):
    r = []
    for n in ("1", "2"):
        r += _norm(f"{path}.norm{n}", f"{d}.norm{n}", f"{o}.norm{n}")
        r += _conv(f"{path}.conv{n}", f"{d}.conv{n}", f"{o}.conv{n}")
    if has_shortcut:
        r += _conv(f"{path}.conv_shortcut", f"{d}.conv_shortcut", f"{o}.nin_shortcut")
    return r


def _mid(path, d, o, attention):
    r = _resnet(f"{path}.resnets.0", f"{d}.mid_block.resnets.0", f"{o}.mid.block_1", False)
    r += _resnet(f"{path}.resnets.1", f"{d}.mid_block.resnets.1", f"{o}.mid.block_2", False)
    if attention:
        a, da, oa = f"{path}.attention", f"{d}.mid_block.attentions.0", f"{o}.mid.attn_1"
        r += _norm(f"{a}.group_norm", f"{da}.group_norm", f"{oa}.norm")
        for mine, dn, on in (("to_q", "to_q", "q"), ("to_k", "to_k", "k"), ("to_v", "to_v", "v"),
                             ("to_out", "to_out.0", "proj_out")):
            r += _attn_proj(f"{a}.{mine}", f"{da}.{dn}", f"{oa}.{on}")
    return r


def rules_for(cfg: VAEConfig):
    ch, n, lpb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    r = []
    # encoder
    r += _conv("encoder.conv_in", "encoder.conv_in", "encoder.conv_in")
    for i, c in enumerate(ch):
        cin = ch[max(i - 1, 0)]
        for j in range(lpb):
            r += _resnet(f"encoder.down.{i}.resnets.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                         f"encoder.down.{i}.block.{j}", j == 0 and cin != c)
        if i < n - 1:
            r += _conv(f"encoder.down.{i}.resample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                       f"encoder.down.{i}.downsample.conv")
    r += _mid("encoder.mid", "encoder", "encoder", cfg.mid_block_add_attention)
    r += _norm("encoder.norm_out", "encoder.conv_norm_out", "encoder.norm_out")
    r += _conv("encoder.conv_out", "encoder.conv_out", "encoder.conv_out")
    # decoder: internal and diffusers index levels in execution order (widest first), LDM by resolution
    rch = tuple(reversed(ch))
    r += _conv("decoder.conv_in", "decoder.conv_in", "decoder.conv_in")
    r += _mid("decoder.mid", "decoder", "decoder", cfg.mid_block_add_attention)
    for i, c in enumerate(rch):
        cin, k = rch[max(i - 1, 0)], n - 1 - i
        for j in range(lpb + 1):
            r += _resnet(f"decoder.up.{i}.resnets.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                         f"decoder.up.{k}.block.{j}", j == 0 and cin != c)
        if i < n - 1:
            r += _conv(f"decoder.up.{i}.resample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv",
                       f"decoder.up.{k}.upsample.conv")
    r += _norm("decoder.norm_out", "decoder.conv_norm_out", "decoder.norm_out")
    r += _conv("decoder.conv_out", "decoder.conv_out", "decoder.conv_out")
    if cfg.use_quant_conv:
        r += _conv("quant_conv", "quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        r += _conv("post_quant_conv", "post_quant_conv", "post_quant_conv")
    return r


def plan(cfg: VAEConfig) -> list[Entry]:
    """Every internal parameter of `AutoencoderKL(cfg)` with its diffusers and LDM keys."""
    return [Entry(tree_path(r.path), r) for r in rules_for(cfg)]


def detect_single_file(tensors: Mapping) -> tuple[str, str]:
    """(key prefix, layout) of the VAE inside a single checkpoint file."""
    keys = list(tensors)
    for prefix in SINGLE_FILE_PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in tensors:
            diffusers = any(k.startswith(f"{prefix}encoder.down_blocks.") for k in keys)
            return prefix, "diffusers" if diffusers else "original"
    raise MMDiTError("no VAE found (no encoder.conv_in.weight under any of the prefixes "
                     f"{[p or '(none)' for p in SINGLE_FILE_PREFIXES]})")


def _shape(tensors, k):
    if hasattr(tensors, "shape"):
        return tuple(tensors.shape(k))
    return tuple(tensors[k].shape)


def config_from_weights(tensors: Mapping, layout: str, origin: str, norm_num_groups: int = 32) -> VAEConfig:
    """The network's shape from tensor shapes. GroupNorm's group count leaves no trace in the weights:
    it is `norm_num_groups` (32 in every released VAE of this family)."""
    down = r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." if layout == "diffusers" else \
        r"encoder\.down\.(\d+)\.block\.(\d+)\."
    level_of = {}
    for k in tensors:
        m = re.match(down, k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            level_of[i] = max(level_of.get(i, -1), j)
    if not level_of or sorted(level_of) != list(range(len(level_of))):
        raise MMDiTError(f"{origin}: cannot detect the VAE's levels (encoder down blocks "
                         f"{sorted(level_of)})")
    res = "encoder.down_blocks.{i}.resnets.0" if layout == "diffusers" else "encoder.down.{i}.block.0"
    attn = "encoder.mid_block.attentions.0.to_q.weight" if layout == "diffusers" else \
        "encoder.mid.attn_1.q.weight"
    try:
        blocks = tuple(_shape(tensors, res.format(i=i) + ".conv1.weight")[0] for i in range(len(level_of)))
        return VAEConfig(
            block_out_channels=blocks, layers_per_block=level_of[0] + 1,
            in_channels=_shape(tensors, "encoder.conv_in.weight")[1],
            out_channels=_shape(tensors, "decoder.conv_out.weight")[0],
            latent_channels=_shape(tensors, "encoder.conv_out.weight")[0] // 2,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=attn in tensors,
            use_quant_conv="quant_conv.weight" in tensors,
            use_post_quant_conv="post_quant_conv.weight" in tensors)
    except KeyError as e:
        raise MMDiTError(f"{origin}: cannot detect the VAE configuration, key {e} is missing") from None
