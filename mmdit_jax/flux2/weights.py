"""FLUX.2 checkpoint layouts (diffusers, BFL original) <-> the internal Flux2 parameter tree.

ComfyUI files are BFL keys behind "model.diffusion_model.", which `families.detect` strips. No FLUX.2
Linear has a bias, so every rule is a kernel (or a norm scale).
"""
from __future__ import annotations

from mmdit_jax.flux2.config import Flux2Config
from mmdit_jax.io.rules import Entry, rule, stacked_entries, tree_path


def kernel(path, diffusers, original, **kw):
    """A bias-free Linear's weight (`diffusers`/`original` are module names, or lists of them fused)."""
    d = (diffusers,) if isinstance(diffusers, str) else diffusers
    o = (original,) if isinstance(original, str) else original
    return rule(f"{path}.kernel", [k + ".weight" for k in d], [k + ".weight" for k in o], "linear", **kw)


def _qk_norm(path, d_q, d_k, o_prefix):
    return [rule(f"{path}.q_norm.scale", f"{d_q}.weight", f"{o_prefix}.query_norm.scale", "vector"),
            rule(f"{path}.k_norm.scale", f"{d_k}.weight", f"{o_prefix}.key_norm.scale", "vector")]


def _stream_rules(s: str, qkv_names, norm_names, proj, ff):
    """One stream (s = "img" or "txt") of a double block."""
    return [
        kernel(f"{s}_attn.qkv", [f"attn.{n}" for n in qkv_names], f"{s}_attn.qkv", reshaped=1),
        *_qk_norm(f"{s}_attn", *(f"attn.{n}" for n in norm_names), f"{s}_attn.norm"),
        kernel(f"{s}_attn.proj", f"attn.{proj}", f"{s}_attn.proj"),
        # SwiGLU input: (gate, value) halves, kept on an axis of their own (see model.SwiGLU)
        kernel(f"{s}_mlp.linear_in", f"{ff}.linear_in", f"{s}_mlp.0", reshaped=1),
        kernel(f"{s}_mlp.linear_out", f"{ff}.linear_out", f"{s}_mlp.2"),
    ]


def double_block_rules(cfg: Flux2Config):
    return (_stream_rules("img", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff")
            + _stream_rules("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"),
                            "to_add_out", "ff_context"))


def single_block_rules(cfg: Flux2Config):
    # both layouts fuse [q, k, v, gate, value] in one Linear and [attn, mlp] in the other; we keep them
    # in chunks of the model width (see model.SingleBlock)
    return [
        kernel("linear1", "attn.to_qkv_mlp_proj", "linear1", reshaped=1),
        *_qk_norm("", "attn.norm_q", "attn.norm_k", "norm"),
        kernel("linear2", "attn.to_out", "linear2", reshaped=2),
    ]


def _embedder(path, d_mod, o_mod):
    return [kernel(f"{path}.in_layer", f"{d_mod}.linear_1", f"{o_mod}.in_layer"),
            kernel(f"{path}.out_layer", f"{d_mod}.linear_2", f"{o_mod}.out_layer")]


def top_rules(cfg: Flux2Config):
    r = [kernel("img_in", "x_embedder", "img_in"),
         kernel("txt_in", "context_embedder", "txt_in"),
         *_embedder("time_in", "time_guidance_embed.timestep_embedder", "time_in"),
         kernel("double_mod_img.lin", "double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
         kernel("double_mod_txt.lin", "double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
         kernel("single_mod.lin", "single_stream_modulation.linear", "single_stream_modulation.lin"),
         # diffusers' AdaLayerNormContinuous stores (scale, shift); BFL and we use (shift, scale)
         kernel("final_layer.mod", "norm_out.linear", "final_layer.adaLN_modulation.1", swapped_in=("diffusers",)),
         kernel("final_layer.linear", "proj_out", "final_layer.linear")]
    if cfg.guidance_embed:
        r += _embedder("guidance_in", "time_guidance_embed.guidance_embedder", "guidance_in")
    return r



def plan(cfg: Flux2Config) -> list[Entry]:
    """Every internal parameter of `Flux2(cfg)` with its external keys."""
    entries = [Entry(tree_path(r.path), r) for r in top_rules(cfg)]
    stacks = [("double_blocks", double_block_rules, cfg.depth, "transformer_blocks", "double_blocks"),
              ("single_blocks", single_block_rules, cfg.depth_single, "single_transformer_blocks",
               "single_blocks")]
    for name, rules_of, n, d_prefix, o_prefix in stacks:
        if n:
            entries += stacked_entries((name, "blocks"), rules_of(cfg), range(n), d_prefix, o_prefix)
    return entries


# FLUX.1 has per-block modulations and a pooled-vector embedder, FLUX.2 shared modulations and a
# combined time/guidance embedder: the keys below exist in one generation only.
def detect_layout(keys) -> str | None:
    keys = set(keys)
    if "x_embedder.weight" in keys and "time_guidance_embed.timestep_embedder.linear_1.weight" in keys:
        return "diffusers"
    if "img_in.weight" in keys and ("single_stream_modulation.lin.weight" in keys
                                    or "double_stream_modulation_img.lin.weight" in keys):
        return "original"
    return None
