"""Tiny random SD3 / FLUX diffusers pipelines saved to disk, and helpers to run diffusers from our
NHWC initial latents, for the sampling tests. Configurations differ from every other test's."""
import numpy as np
import torch

from conftest import randomize_torch_
from text_tiny import clip_model, make_t5_tokenizer, t5_model, write_clip_tokenizer


def _vae(scale, shift, seed, levels=2):
    from diffusers import AutoencoderKL

    return randomize_torch_(AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16)[:levels],
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=16, scaling_factor=scale,
        shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False).eval(), std=0.12, seed=seed)


def sd3_pipeline(tmp, *, scheduler=None, dual=(), qk_norm=None, layers=3, t5=True, seed=20, sample_size=6):
    """StableDiffusion3Pipeline with a 2-level VAE (factor 2), saved under tmp/pipe; returns (pipe, folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok_l, vocab = write_clip_tokenizer(str(tmp / "tl"), 10)
    tok_g, _ = write_clip_tokenizer(str(tmp / "tg"), 10, pad_token="!")
    tok_t5, t5_vocab = make_t5_tokenizer()
    tr = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=48, caption_projection_dim=24, pooled_projection_dim=40,
        out_channels=16, pos_embed_max_size=9, qk_norm=qk_norm, dual_attention_layers=tuple(dual)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=randomize_torch_(tr, std=0.08, seed=seed, buffers=("pos_embed.pos_embed",)),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(1.5305, 0.0609, seed + 1),
        text_encoder=clip_model(vocab, width=16, heads=2, layers=2, projection=16, seed=seed + 2, positions=10),
        tokenizer=tok_l,
        text_encoder_2=clip_model(vocab, width=24, heads=2, layers=2, act="gelu", projection=24, seed=seed + 3,
                                  positions=10),
        tokenizer_2=tok_g, text_encoder_3=t5_model(t5_vocab, d_model=48, seed=seed + 4) if t5 else None,
        tokenizer_3=tok_t5 if t5 else None)
    folder = tmp / "pipe"
    pipe.save_pretrained(str(folder))
    return pipe, str(folder)


def flux_pipeline(tmp, *, guidance=True, scheduler=None, seed=30):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok_l, vocab = write_clip_tokenizer(str(tmp / "tl"), 10)
    tok_t5, t5_vocab = make_t5_tokenizer()
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6)).eval()
    sched = scheduler or (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True) if guidance
                          else FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe = FluxPipeline(
        transformer=randomize_torch_(tr, std=0.08, seed=seed), scheduler=sched, vae=_vae(0.3611, 0.1159, seed + 1),
        text_encoder=clip_model(vocab, width=16, heads=2, layers=2, seed=seed + 2, positions=10), tokenizer=tok_l,
        text_encoder_2=t5_model(t5_vocab, d_model=24, seed=seed + 3), tokenizer_2=tok_t5)
    folder = tmp / "pipe"
    pipe.save_pretrained(str(folder))
    return pipe, str(folder)


def nchw(x):
    return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def flux_packed(x):
    """NHWC latents -> FluxPipeline's packed (B, h/2 * w/2, 4C) tokens."""
    from diffusers import FluxPipeline

    t = nchw(x)
    b, c, h, w = t.shape
    return FluxPipeline._pack_latents(t, b, c, h, w)


def flux_unpacked(tokens, h, w):
    """Packed tokens (as FluxPipeline returns for output_type='latent') -> NHWC."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(b, h, w, c).numpy()


def not_saturated(images):
    """The comparison means something only where the [0, 1] clip did not flatten the image."""
    inside = np.mean((images > 0.02) & (images < 0.98))
    return inside > 0.3
