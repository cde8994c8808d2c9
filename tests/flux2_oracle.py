"""Test-side FLUX.2 oracle: tiny diffusers Flux2Transformer2DModels and a call in our conventions.

Token packing and position ids (image, text and reference ids) come from diffusers' own Flux2Pipeline
helpers, so the oracle shares no code (and no assumption about id layout) with mmdit_jax.
"""
import numpy as np

from conftest import randomize_torch_

# 2 heads x 16 dims, RoPE axes summing to 16; an odd channel count and text width; mlp_ratio 3 as
# released (3 chunks of the model width in the single blocks' fused projections)
TINY = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=20, timestep_guidance_channels=64, mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4), rope_theta=2000)


def tiny_flux2(guidance: bool, seed: int = 0, std: float = 0.2, **overrides):
    """A randomized tiny diffusers FLUX.2 transformer (every parameter random, norm scales too)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**{**TINY, "guidance_embeds": guidance, **overrides})
    return randomize_torch_(model, std=std, seed=seed).eval()


def inputs(rng, cfg: dict, batch=2, h=3, w=5, text_len=4, guidance=True, refs=()):
    """NHWC latents, sigma, context, guidance (or None), references (list of (B, h_i, w_i, C))."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    c = cfg["in_channels"]
    g = rng.uniform(1.0, 5.0, batch).astype(np.float32) if guidance else None
    return (f(batch, h, w, c), rng.uniform(0.05, 0.95, batch).astype(np.float32),
            f(batch, text_len, cfg["joint_attention_dim"]), g, [f(batch, rh, rw, c) for rh, rw in refs])


def torch_forward(model, latents, sigma, context, guidance=None, references=()):
    """diffusers forward with our API's inputs, ids built as Flux2Pipeline builds them (torch tensors in,
    NHWC torch tensor out; differentiable)."""
    import torch
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as P

    b = latents.shape[0]
    nchw = latents.permute(0, 3, 1, 2)
    hidden, img_ids = P._pack_latents(nchw), P._prepare_latent_ids(nchw)
    if references:
        refs = [r.permute(0, 3, 1, 2) for r in references]
        # the pipeline repeats one set of references over the batch; ids depend only on their shapes
        ref_ids = P._prepare_image_ids([r[:1] for r in refs]).repeat(b, 1, 1)
        hidden = torch.cat([hidden] + [P._pack_latents(r) for r in refs], dim=1)
        img_ids = torch.cat([img_ids, ref_ids], dim=1)
    out = model(hidden_states=hidden, encoder_hidden_states=context, timestep=sigma, guidance=guidance,
                img_ids=img_ids, txt_ids=P._prepare_text_ids(context), return_dict=False)[0]
    n = latents.shape[1] * latents.shape[2]
    return P._unpack_latents_with_ids(out[:, :n], P._prepare_latent_ids(nchw)).permute(0, 2, 3, 1)


def reference(model, latents, sigma, context, guidance=None, references=()):
    """diffusers output as numpy NHWC for numpy inputs."""
    import torch

    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        return torch_forward(model, t(latents), t(sigma), t(context), t(guidance),
                             [t(r) for r in references]).numpy()


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
