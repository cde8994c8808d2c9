"""Sampling time per denoising step: mj.Pipeline (one jitted loop) against diffusers, in one process on
the same small random pipelines (SD3 layout with CFG, FLUX.1-dev layout with embedded guidance).

Per-step time is the slope between two step counts, (t(N2) - t(N1)) / (N2 - N1), so text encoding and
fixed overheads cancel; outputs are latents (the VAE is not timed). Repetitions of the two
implementations are interleaved and medians reported, since the machine may be shared.

    python benchmarks/sampling.py [--sizes 32x32,64x48] [--reps 5] [--steps 2,6]
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import mmdit_jax as mj  # noqa: E402
from conftest import randomize_torch_  # noqa: E402
from text_tiny import clip_model, make_t5_tokenizer, t5_model, write_clip_tokenizer  # noqa: E402


def _vae(scale, shift):
    from diffusers import AutoencoderKL

    return randomize_torch_(AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
        scaling_factor=scale, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False).eval(),
        std=0.1, seed=1)


def build(kind, folder):
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    tok_l, vocab = write_clip_tokenizer(os.path.join(folder, "tl"), 77)
    tok_t5, t5_vocab = make_t5_tokenizer()
    if kind == "sd3":
        tok_g, _ = write_clip_tokenizer(os.path.join(folder, "tg"), 77, pad_token="!")
        tr = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                                   num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                                   pooled_projection_dim=64, out_channels=16, pos_embed_max_size=48,
                                   qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(
            transformer=randomize_torch_(tr.eval(), std=0.05, seed=2, buffers=("pos_embed.pos_embed",)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(1.5305, 0.0609),
            text_encoder=clip_model(vocab, width=32, heads=2, layers=2, projection=32, positions=77, seed=3),
            tokenizer=tok_l,
            text_encoder_2=clip_model(vocab, width=32, heads=2, layers=2, projection=32, positions=77, seed=4),
            tokenizer_2=tok_g, text_encoder_3=t5_model(t5_vocab, d_model=256, seed=5), tokenizer_3=tok_t5)
    else:
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                    attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
        pipe = FluxPipeline(
            transformer=randomize_torch_(tr.eval(), std=0.05, seed=2),
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_vae(0.3611, 0.1159),
            text_encoder=clip_model(vocab, width=32, heads=2, layers=2, positions=77, seed=3), tokenizer=tok_l,
            text_encoder_2=t5_model(t5_vocab, d_model=256, seed=5), tokenizer_2=tok_t5)
    pipe.save_pretrained(os.path.join(folder, "pipe"))
    return pipe, mj.Pipeline.from_pretrained(os.path.join(folder, "pipe"))


def timers(kind, ref, ours, h, w):
    x0 = np.random.default_rng(0).standard_normal((1, h, w, 16)).astype(np.float32)
    t = torch.tensor(x0).permute(0, 3, 1, 2).contiguous()
    if kind == "flux":
        t = ref._pack_latents(t, 1, 16, h, w)
    f = 8
    common = dict(prompt="a red cat on the mat", height=h * f, width=w * f, max_sequence_length=64,
                  output_type="latent")

    def run_ref(n):
        with torch.no_grad():
            ref(latents=t, num_inference_steps=n, **common)

    def run_ours(n):
        jax.block_until_ready(ours(latents=x0, num_inference_steps=n, **common))

    return run_ref, run_ours


def seconds(fn, n):
    t = time.perf_counter()
    fn(n)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32x32,64x48", help="latent HxW (images are 8x larger)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", default="2,6")
    ap.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args()
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    n1, n2 = map(int, a.steps.split(","))
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    print(f"machine: {platform.machine()} {jax.default_backend()} ({os.cpu_count()} cpus), jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| layout | latent | image | diffusers s/step | mmdit-jax s/step | speed-up |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sd3", "flux"):
            ref, ours = build(kind, os.path.join(tmp, kind))
            ref.set_progress_bar_config(disable=True)
            for size in a.sizes.split(","):
                h, w = map(int, size.split("x"))
                run_ref, run_ours = timers(kind, ref, ours, h, w)
                for n in (n1, n2):  # warm-up: compiles (ours), allocator and thread pools (both)
                    run_ref(n)
                    run_ours(n)
                per = {"ref": [], "ours": []}
                for _ in range(a.reps):  # interleaved
                    for name, fn in (("ref", run_ref), ("ours", run_ours)):
                        per[name].append((seconds(fn, n2) - seconds(fn, n1)) / (n2 - n1))
                r, o = statistics.median(per["ref"]), statistics.median(per["ours"])
                label = "SD3 (CFG, batch 2 per step)" if kind == "sd3" else "FLUX.1-dev (guidance embed)"
                print(f"| {label} | {h}x{w} | {h * 8}x{w * 8} | {r:.4f} | {o:.4f} | {r / o:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
