"""Tiny random diffusers SD3 models and their SAI-layout twins, for the SD3 tests."""
import numpy as np
import torch

from conftest import randomize_torch_


def tiny_config(**kw):
    cfg = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32,
               num_attention_heads=2, joint_attention_dim=40, caption_projection_dim=64,
               pooled_projection_dim=24, out_channels=16, pos_embed_max_size=12,
               dual_attention_layers=(), qk_norm=None)
    cfg.update(kw)
    cfg["caption_projection_dim"] = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    return cfg


def tiny_model(seed=0, std=0.1, **kw):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**tiny_config(**kw)).eval()
    return randomize_torch_(model, std=std, seed=seed, buffers=("pos_embed.pos_embed",))


def inputs(cfg, batch=2, h=10, w=6, text_len=7, seed=0):
    r = np.random.default_rng(seed)
    return dict(
        latents=r.standard_normal((batch, h, w, cfg["in_channels"])).astype(np.float32),
        sigma=r.uniform(0.05, 1.0, (batch,)).astype(np.float32),
        context=r.standard_normal((batch, text_len, cfg["joint_attention_dim"])).astype(np.float32),
        pooled=r.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32),
    )


def torch_forward(model, x, grad=False):
    """The oracle: diffusers' forward on NCHW, timestep = 1000 * sigma, back to NHWC."""
    lat = torch.tensor(x["latents"]).permute(0, 3, 1, 2).requires_grad_(grad)
    out = model(hidden_states=lat, encoder_hidden_states=torch.tensor(x["context"]),
                pooled_projections=torch.tensor(x["pooled"]),
                timestep=torch.tensor(x["sigma"]) * 1000).sample
    return lat, out.permute(0, 2, 3, 1)


def to_sai(state_dict, num_layers, prefix="model.diffusion_model."):
    """diffusers SD3 state dict -> SAI original layout, written from SPEC.md's key table.

    Kept independent of the library's own plan; the tests check it against diffusers' converter."""
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    out = {}

    def put(dst, src):
        out[prefix + dst] = sd.pop(src)

    def put_lin(dst, src):
        put(dst + ".weight", src + ".weight")
        put(dst + ".bias", src + ".bias")

    def swap(t):  # diffusers (scale, shift) <-> original (shift, scale)
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)

    put("pos_embed", "pos_embed.pos_embed")
    put_lin("x_embedder.proj", "pos_embed.proj")
    put_lin("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    put_lin("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    put_lin("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    put_lin("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    put_lin("context_embedder", "context_embedder")
    put_lin("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        out[f"{prefix}final_layer.adaLN_modulation.1.{s}"] = swap(sd.pop(f"norm_out.linear.{s}"))
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{prefix}{o}x_block.attn.qkv.{s}"] = torch.cat(
                [sd.pop(f"{d}attn.to_{n}.{s}") for n in "qkv"])
            out[f"{prefix}{o}context_block.attn.qkv.{s}"] = torch.cat(
                [sd.pop(f"{d}attn.add_{n}_proj.{s}") for n in "qkv"])
            if f"{d}attn2.to_q.{s}" in sd:
                out[f"{prefix}{o}x_block.attn2.qkv.{s}"] = torch.cat(
                    [sd.pop(f"{d}attn2.to_{n}.{s}") for n in "qkv"])
        pre_only = f"{d}ff_context.net.2.weight" not in sd
        for s in ("weight", "bias"):
            t = sd.pop(f"{d}norm1_context.linear.{s}")
            out[f"{prefix}{o}context_block.adaLN_modulation.1.{s}"] = swap(t) if pre_only else t
        put_lin(o + "x_block.adaLN_modulation.1", d + "norm1.linear")
        put_lin(o + "x_block.attn.proj", d + "attn.to_out.0")
        put_lin(o + "x_block.mlp.fc1", d + "ff.net.0.proj")
        put_lin(o + "x_block.mlp.fc2", d + "ff.net.2")
        if not pre_only:
            put_lin(o + "context_block.attn.proj", d + "attn.to_add_out")
            put_lin(o + "context_block.mlp.fc1", d + "ff_context.net.0.proj")
            put_lin(o + "context_block.mlp.fc2", d + "ff_context.net.2")
        if f"{d}attn2.to_out.0.weight" in sd:
            put_lin(o + "x_block.attn2.proj", d + "attn2.to_out.0")
        for name, src in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                          ("context_block.attn.ln_q", "attn.norm_added_q"),
                          ("context_block.attn.ln_k", "attn.norm_added_k"),
                          ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if f"{d}{src}.weight" in sd:
                put(f"{o}{name}.weight", f"{d}{src}.weight")
    assert not sd, f"unmapped diffusers keys: {sorted(sd)}"
    return out
