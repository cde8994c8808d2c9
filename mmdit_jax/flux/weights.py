"""FLUX checkpoint layouts (diffusers, BFL original) <-> the internal Flux parameter tree.

ComfyUI files are BFL keys behind "model.diffusion_model.", which `families.detect` strips.
"""
from __future__ import annotations

from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.io.rules import Entry, linear, rule, stacked_entries, tree_path


def _embedder(path, d_mod, o_mod):
    return [*linear(f"{path}.in_layer", f"{d_mod}.linear_1", f"{o_mod}.in_layer"),
            *linear(f"{path}.out_layer", f"{d_mod}.linear_2", f"{o_mod}.out_layer")]


def _qk_norm(path, d_q, d_k, o_prefix):
    return [rule(f"{path}.q_norm.scale", f"{d_q}.weight", f"{o_prefix}.query_norm.scale", "vector"),
            rule(f"{path}.k_norm.scale", f"{d_k}.weight", f"{o_prefix}.key_norm.scale", "vector")]


def _stream_rules(cfg: FluxConfig, s: str, qkv_names, norm_names, proj, ff):
    """One stream (s = "img" or "txt") of a double block."""
    qkv = linear(f"{s}_attn.qkv", [f"attn.{n}" for n in qkv_names], f"{s}_attn.qkv", reshaped=1)
    if not cfg.qkv_bias:
        qkv = qkv[:1]
    return [
        *linear(f"{s}_mod.lin", "norm1.linear" if s == "img" else "norm1_context.linear", f"{s}_mod.lin"),
        *qkv,
        *_qk_norm(f"{s}_attn", *(f"attn.{n}" for n in norm_names), f"{s}_attn.norm"),
        *linear(f"{s}_attn.proj", f"attn.{proj}", f"{s}_attn.proj"),
        *linear(f"{s}_mlp.fc1", f"{ff}.net.0.proj", f"{s}_mlp.0"),
        *linear(f"{s}_mlp.fc2", f"{ff}.net.2", f"{s}_mlp.2"),
    ]


def double_block_rules(cfg: FluxConfig):
    return (_stream_rules(cfg, "img", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff")
            + _stream_rules(cfg, "txt", ("add_q_proj", "add_k_proj", "add_v_proj"),
                            ("norm_added_q", "norm_added_k"), "to_add_out", "ff_context"))


def single_block_rules(cfg: FluxConfig):
    h = cfg.hidden_size
    return [
        *linear("modulation.lin", "norm.linear", "modulation.lin"),
        # BFL fuses q, k, v and the MLP input in linear1; diffusers keeps four Linears. Both are stored
        # in chunks of width h (see SingleBlock)
        *linear("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear1",
                parts=(h, h, h, cfg.mlp_hidden), reshaped=1),
        *_qk_norm("", "attn.norm_q", "attn.norm_k", "norm"),
        *linear("linear2", "proj_out", "linear2", reshaped=2),
    ]


def top_rules(cfg: FluxConfig):
    r = [*linear("img_in", "x_embedder", "img_in"),
         *linear("txt_in", "context_embedder", "txt_in"),
         *_embedder("time_in", "time_text_embed.timestep_embedder", "time_in"),
         *_embedder("vector_in", "time_text_embed.text_embedder", "vector_in"),
         # diffusers' AdaLayerNormContinuous stores (scale, shift); BFL and we use (shift, scale)
         *linear("final_layer.mod.lin", "norm_out.linear", "final_layer.adaLN_modulation.1",
                 swapped_in=("diffusers",)),
         *linear("final_layer.linear", "proj_out", "final_layer.linear")]
    if cfg.guidance_embed:
        r += _embedder("guidance_in", "time_text_embed.guidance_embedder", "guidance_in")
    return r


def plan(cfg: FluxConfig) -> list[Entry]:
    """Every internal parameter of `Flux(cfg)` with its external keys."""
    entries = [Entry(tree_path(r.path), r) for r in top_rules(cfg)]
    stacks = [("double_blocks", double_block_rules, cfg.depth, "transformer_blocks", "double_blocks"),
              ("single_blocks", single_block_rules, cfg.depth_single, "single_transformer_blocks",
               "single_blocks")]
    for name, rules_of, n, d_prefix, o_prefix in stacks:
        if n:
            entries += stacked_entries((name, "blocks"), rules_of(cfg), range(n), d_prefix, o_prefix)
    return entries


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if "x_embedder.weight" in keys and "time_text_embed.timestep_embedder.linear_1.weight" in keys:
        return "diffusers"
    # FLUX.2's BFL files also have img_in and time_in; only FLUX.1 has the pooled-vector embedder
    if "img_in.weight" in keys and "time_in.in_layer.weight" in keys and "vector_in.in_layer.weight" in keys:
        return "original"
    return None
