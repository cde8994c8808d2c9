"""Test-side FLUX oracle: tiny diffusers FluxTransformer2DModels and a call in our conventions.

Packing, unpacking and image ids come from diffusers' own FluxPipeline helpers, so the oracle shares
no code (and no assumption about channel order or id layout) with mmdit_jax.
"""
import contextlib
import math

import numpy as np

from conftest import randomize_torch_

# head_dim 32 so a single file's RoPE split can be inferred (FLUX proportions: 1/8, 7/16, 7/16)
TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
            axes_dims_rope=(4, 14, 14))


def tiny_flux(guidance: bool, seed: int = 0, std: float = 0.2, **overrides):
    """A randomized tiny diffusers FLUX transformer (every parameter random, biases and norms too)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, "guidance_embeds": guidance, **overrides})
    return randomize_torch_(model, std=std, seed=seed).eval()


def inputs(rng, cfg: dict, batch=2, h=4, w=6, text_len=5, guidance=True):
    """NHWC latents, sigma in [0, 1], context, pooled, guidance scale (or None), as float32 numpy."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    g = rng.uniform(1.0, 5.0, batch).astype(np.float32) if guidance else None
    return (f(batch, h, w, cfg["in_channels"] // 4), rng.uniform(0.05, 0.95, batch).astype(np.float32),
            f(batch, text_len, cfg["joint_attention_dim"]), f(batch, cfg["pooled_projection_dim"]), g)


def torch_forward(model, latents, sigma, context, pooled, guidance=None):
    """diffusers forward with our API's inputs (torch tensors in, NHWC torch tensor out; differentiable)."""
    import torch
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    b, h, w, c = latents.shape
    packed = FluxPipeline._pack_latents(latents.permute(0, 3, 1, 2), b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(context.shape[1], 3)
    # the pipeline passes timestep / 1000 = sigma and the raw guidance scale; the model scales both
    out = model(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled,
                timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
    return FluxPipeline._unpack_latents(out, h, w, 1).permute(0, 2, 3, 1)


def reference(model, latents, sigma, context, pooled, guidance=None):
    """diffusers output as numpy NHWC for numpy inputs."""
    import torch

    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        return torch_forward(model, t(latents), t(sigma), t(context), t(pooled), t(guidance)).numpy()


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def correctly_rounded_sinusoid():
    """Run diffusers with its timestep-sinusoid frequencies correctly rounded to float32.

    torch's float32 exp (and XLA's) is off by an ulp on a few of the 128 frequencies, differently on
    each side; at FLUX phases (1000 * guidance ~ 5000 rad) that alone moves a random tiny network's
    output by ~5e-5, as much as a 1-ulp change of the guidance input does. Everything else about the
    sinusoid (float32 phase products, [cos, sin] order) is unchanged, so the 1e-5 parity bar tests
    the network rather than two exp implementations. `test_sinusoid_matches_diffusers` checks the
    unpatched oracle separately."""
    import torch
    from diffusers.models import embeddings

    original = embeddings.get_timestep_embedding

    def patched(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                max_period=10000):
        assert flip_sin_to_cos and downscale_freq_shift == 0 and scale == 1 and embedding_dim % 2 == 0
        half = embedding_dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
        freqs = torch.exp(exponent.double()).float()
        phase = timesteps[:, None].float() * freqs[None, :]
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)

    embeddings.get_timestep_embedding = patched
    try:
        yield
    finally:
        embeddings.get_timestep_embedding = original


def to_bfl(sd: dict) -> dict:
    """A diffusers FLUX state dict (torch or numpy tensors) in BFL key layout, written from the key
    table in SPEC.md. `test_bfl_writer_inverts_diffusers_converter` checks it against diffusers' own
    BFL -> diffusers converter."""
    cat = (lambda xs: np.concatenate(xs, 0)) if isinstance(next(iter(sd.values())), np.ndarray) else \
        (lambda xs: __import__("torch").cat(xs, 0))
    out = {}

    def lin(dst, src):  # weight and bias; src may list several diffusers modules fused on dim 0
        src = [src] if isinstance(src, str) else src
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = cat([sd[f"{s}.{p}"] for s in src]) if len(src) > 1 else sd[f"{src[0]}.{p}"]

    for bfl, d in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        if f"time_text_embed.{d}_embedder.linear_1.weight" in sd:
            lin(f"{bfl}.in_layer", f"time_text_embed.{d}_embedder.linear_1")
            lin(f"{bfl}.out_layer", f"time_text_embed.{d}_embedder.linear_2")
    lin("txt_in", "context_embedder")
    lin("img_in", "x_embedder")
    lin("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):  # diffusers keeps (scale, shift), BFL (shift, scale)
        a = sd[f"norm_out.linear.{p}"]
        scale, shift = a[:len(a) // 2], a[len(a) // 2:]
        out[f"final_layer.adaLN_modulation.1.{p}"] = cat([shift, scale])
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        lin(o + "img_mod.lin", b + "norm1.linear")
        lin(o + "txt_mod.lin", b + "norm1_context.linear")
        lin(o + "img_attn.qkv", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"])
        lin(o + "txt_attn.qkv", [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"])
        lin(o + "img_attn.proj", b + "attn.to_out.0")
        lin(o + "txt_attn.proj", b + "attn.to_add_out")
        lin(o + "img_mlp.0", b + "ff.net.0.proj")
        lin(o + "img_mlp.2", b + "ff.net.2")
        lin(o + "txt_mlp.0", b + "ff_context.net.0.proj")
        lin(o + "txt_mlp.2", b + "ff_context.net.2")
        for s, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[o + f"{s}_attn.norm.query_norm.scale"] = sd[b + f"attn.{q}.weight"]
            out[o + f"{s}_attn.norm.key_norm.scale"] = sd[b + f"attn.{k}.weight"]
    for i in range(n_single):
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        lin(o + "modulation.lin", b + "norm.linear")
        lin(o + "linear1", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"])
        lin(o + "linear2", b + "proj_out")
        out[o + "norm.query_norm.scale"] = sd[b + "attn.norm_q.weight"]
        out[o + "norm.key_norm.scale"] = sd[b + "attn.norm_k.weight"]
    return out
