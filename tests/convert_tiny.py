"""Tiny random SD3 and FLUX-dev pipelines written in every source form mmdit-convert reads.

Sizes are chosen so single files can be read without a config: CLIP towers 128 wide with 64-wide
heads, VAE GroupNorm of 32 groups, FLUX head_dim 32 with FLUX-proportioned RoPE axes. SD3's CLIP-L gets
an identity text_projection (what diffusers gives the projection-less CLIP-L of SAI files), so the
pipeline and the single file hold the same network.
"""
import os

import numpy as np
import torch

from conftest import randomize_torch_
from flux_oracle import TINY, to_bfl
from sd3_oracle import to_sai
from text_tiny import clip_model, make_t5_tokenizer, t5_model, write_clip_tokenizer


def _numpy(sd):
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


def tiny_vae(scale, shift, seed):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=16,
                        scaling_factor=scale, shift_factor=shift, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return randomize_torch_(vae, std=0.1, seed=seed)


def ldm_vae(vae):
    """The LDM (SAI / BFL) layout of a diffusers VAE, through the library's plan (which
    tests/test_vae.py checks against diffusers' own LDM converter)."""
    import jax.numpy as jnp

    from mmdit_jax.io import rules
    from mmdit_jax.vae import weights
    from mmdit_jax.vae.loader import _network
    from mmdit_jax.vae.config import VAEConfig

    cfg = VAEConfig.from_diffusers(dict(vae.config))
    template = _network(cfg, jnp.float32).structure.abstract_params()
    internal = rules.import_params(weights.plan(cfg), _numpy(vae.state_dict()), "diffusers", template, "t",
                                   lambda a, t: a)
    return dict(rules.export_params(weights.plan(cfg), internal, "original"))


def sd3_pipeline(tmp, seed=0):
    """A StableDiffusion3Pipeline (SD3.5-style transformer: QK-norm and one dual-attention block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok_l, vocab = write_clip_tokenizer(os.path.join(tmp, "tl"), 12)
    tok_g, _ = write_clip_tokenizer(os.path.join(tmp, "tg"), 12, pad_token="!")
    tok_t5, t5_vocab = make_t5_tokenizer()
    clip_l = clip_model(vocab, width=128, heads=2, ffn=96, layers=2, projection=128, seed=seed + 1,
                        positions=12)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(128))
    clip_g = clip_model(vocab, width=128, heads=2, ffn=96, layers=2, act="gelu", projection=40,
                        seed=seed + 2, positions=12)
    t5 = t5_model(t5_vocab, d_model=64, seed=seed + 3)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=48, pooled_projection_dim=168,
        out_channels=16, pos_embed_max_size=10, qk_norm="rms_norm", dual_attention_layers=(1,)).eval()
    transformer = randomize_torch_(transformer, std=0.1, seed=seed + 4, buffers=("pos_embed.pos_embed",))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(1.5305, 0.0609, seed + 5), text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
        tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)


def flux_pipeline(tmp, seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok_l, vocab = write_clip_tokenizer(os.path.join(tmp, "tl"), 12)
    tok_t5, t5_vocab = make_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**{**TINY, "guidance_embeds": True}).eval()
    return FluxPipeline(
        transformer=randomize_torch_(transformer, std=0.2, seed=seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096),
        vae=tiny_vae(0.3611, 0.1159, seed + 2),
        text_encoder=clip_model(vocab, width=TINY["pooled_projection_dim"], heads=2, seed=seed + 3,
                                positions=12),
        tokenizer=tok_l,
        text_encoder_2=t5_model(t5_vocab, d_model=TINY["joint_attention_dim"], seed=seed + 4),
        tokenizer_2=tok_t5)


def sai_file_tensors(pipe, with_vae=True, with_text=True):
    """An SAI SD3 / SD3.5 single file: network under model.diffusion_model., VAE under
    first_stage_model. (LDM layout), text towers under text_encoders.*.transformer. (CLIP-L nested
    under text_model. as transformers 4 saved it, without a projection)."""
    out = _numpy(to_sai(pipe.transformer.state_dict(), pipe.transformer.config.num_layers))
    if with_vae:
        out.update({"first_stage_model." + k: v for k, v in ldm_vae(pipe.vae).items()})
    if with_text:
        nest = lambda k: k if k.startswith("text_model.") else "text_model." + k  # noqa: E731
        for k, v in _numpy(pipe.text_encoder.state_dict()).items():
            if not k.startswith("text_projection"):
                out["text_encoders.clip_l.transformer." + nest(k)] = v
        for k, v in _numpy(pipe.text_encoder_2.state_dict()).items():
            out["text_encoders.clip_g.transformer." + k] = v
        for k, v in _numpy(pipe.text_encoder_3.state_dict()).items():
            out["text_encoders.t5xxl.transformer." + k] = v
    return out


def bfl_file_tensors(pipe, prefix=""):
    """A BFL FLUX transformer file (ComfyUI: prefix "model.diffusion_model.")."""
    return {prefix + k: v for k, v in to_bfl(_numpy(pipe.transformer.state_dict())).items()}


def save_torch_pickle(tensors, path):
    """A plain state-dict pickle as PyTorch writes .ckpt files (read only with weights_only=True)."""
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}}, path)
