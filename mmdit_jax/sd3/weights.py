"""SD3 checkpoint layouts (diffusers and SAI original) <-> the internal MMDiT parameter tree."""
from __future__ import annotations

from mmdit_jax.io.rules import Entry, linear, rule, stacked_entries, tree_path
from mmdit_jax.sd3.config import MMDiTConfig

def _qkv(path, d_mod, d_names, o_mod):
    # stored (in, 3, width): see QKV
    return linear(path, [f"{d_mod}.{n}" for n in d_names], f"{o_mod}.qkv", reshaped=1)


def block_rules(dual: bool, pre_only: bool):
    r = []
    # x stream
    r += linear("x_block.mod.lin", "norm1.linear", "x_block.adaLN_modulation.1")
    r += _qkv("x_block.attn.qkv", "attn", ("to_q", "to_k", "to_v"), "x_block.attn")
    r += linear("x_block.proj", "attn.to_out.0", "x_block.attn.proj")
    r += linear("x_block.mlp.fc1", "ff.net.0.proj", "x_block.mlp.fc1")
    r += linear("x_block.mlp.fc2", "ff.net.2", "x_block.mlp.fc2")
    # context stream; the last block's 2-chunk adaLN is (scale, shift) in diffusers
    swap = ("diffusers",) if pre_only else ()
    r += linear("context_block.mod.lin", "norm1_context.linear", "context_block.adaLN_modulation.1",
                swapped_in=swap)
    r += _qkv("context_block.attn.qkv", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
              "context_block.attn")
    if not pre_only:
        r += linear("context_block.proj", "attn.to_add_out", "context_block.attn.proj")
        r += linear("context_block.mlp.fc1", "ff_context.net.0.proj", "context_block.mlp.fc1")
        r += linear("context_block.mlp.fc2", "ff_context.net.2", "context_block.mlp.fc2")
    if dual:
        r += _qkv("attn2.attn.qkv", "attn2", ("to_q", "to_k", "to_v"), "x_block.attn2")
        r += linear("attn2.proj", "attn2.to_out.0", "x_block.attn2.proj")
    return r


def qk_norm_rules(dual: bool):
    r = [rule("x_block.attn.q_norm.scale", "attn.norm_q.weight", "x_block.attn.ln_q.weight", "vector"),
         rule("x_block.attn.k_norm.scale", "attn.norm_k.weight", "x_block.attn.ln_k.weight", "vector"),
         rule("context_block.attn.q_norm.scale", "attn.norm_added_q.weight",
              "context_block.attn.ln_q.weight", "vector"),
         rule("context_block.attn.k_norm.scale", "attn.norm_added_k.weight",
              "context_block.attn.ln_k.weight", "vector")]
    if dual:
        r += [rule("attn2.attn.q_norm.scale", "attn2.norm_q.weight", "x_block.attn2.ln_q.weight", "vector"),
              rule("attn2.attn.k_norm.scale", "attn2.norm_k.weight", "x_block.attn2.ln_k.weight", "vector")]
    return r


TOP_RULES = [
    rule("x_embedder.kernel", "pos_embed.proj.weight", "x_embedder.proj.weight", "patch"),
    rule("x_embedder.bias", "pos_embed.proj.bias", "x_embedder.proj.bias", "vector"),
    rule("pos_embed", "pos_embed.pos_embed", "pos_embed", "table"),
    *linear("t_embedder.in_layer", "time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    *linear("t_embedder.out_layer", "time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    *linear("y_embedder.in_layer", "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    *linear("y_embedder.out_layer", "time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    *linear("context_embedder", "context_embedder", "context_embedder"),
    *linear("final_layer.mod.lin", "norm_out.linear", "final_layer.adaLN_modulation.1",
            swapped_in=("diffusers",)),
    *linear("final_layer.linear", "proj_out", "final_layer.linear"),
]


# a guidance-distilled student's embedder: diffusers' FLUX name in the diffusers layout, an SAI-style name
GUIDANCE_RULES = [
    *linear("g_embedder.in_layer", "time_text_embed.guidance_embedder.linear_1", "g_embedder.mlp.0"),
    *linear("g_embedder.out_layer", "time_text_embed.guidance_embedder.linear_2", "g_embedder.mlp.2"),
]


def plan(cfg: MMDiTConfig) -> list[Entry]:
    """Every internal parameter of `MMDiT(cfg)` with its external keys."""
    rules = TOP_RULES + (GUIDANCE_RULES if cfg.guidance_embed else [])
    entries = [Entry(tree_path(r.path), r) for r in rules]
    for g, ((dual, pre_only), idx) in enumerate(cfg.groups()):
        rules = block_rules(dual, pre_only) + (qk_norm_rules(dual) if cfg.qk_norm else [])
        entries += stacked_entries(("groups", g, "blocks"), rules, idx, "transformer_blocks", "joint_blocks")
    return entries


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if "pos_embed.proj.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    if "x_embedder.proj.weight" in keys and any(k.startswith("joint_blocks.") for k in keys):
        return "original"
    return None
