"""Prompt encoding: mj.load_text_encoders(...)(prompts) versus StableDiffusion3Pipeline.encode_prompt,
same weights, tokenisation included on both sides.

CLIP-L-like (width 256, 4 layers), CLIP-G-like (width 320, 4 layers, projection) and T5-like (width
256, 4 layers, 4 x 64 heads, FFN 1024) encoders with the tests' tiny tokenizers; 77 CLIP tokens and
128 T5 tokens (the pipelines' real lengths are 77 and 256).

    python benchmarks/text_encode.py [--reps 7]
"""
import argparse
import os
import sys
import tempfile

import numpy as np

import common

PROMPTS = ["a photo of a red cat on the mat", "the big blue sky over a dog"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--t5-length", type=int, default=128)
    a = ap.parse_args()

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    import mmdit_jax as mj
    import setups

    sys.path.insert(0, os.path.join(common.ROOT, "tests"))  # the tests' tokenizer and model builders
    from text_tiny import clip_model, make_t5_tokenizer, t5_model, write_clip_tokenizer

    load0 = common.loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tok_l, vocab = write_clip_tokenizer(os.path.join(tmp, "tl"), 77)
        tok_g, _ = write_clip_tokenizer(os.path.join(tmp, "tg"), 77, pad_token="!")
        tok_t5, t5_vocab = make_t5_tokenizer()
        transformer = setups.torch_transformer(setups.Case("sd3", 1, 8, 8, 8, dict(
            sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=256, caption_projection_dim=32, pooled_projection_dim=256 + 320, out_channels=16,
            pos_embed_max_size=8)))
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(block_out_channels=(32,), latent_channels=16, norm_num_groups=32,
                            use_quant_conv=False, use_post_quant_conv=False)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=clip_model(vocab, width=256, heads=4, layers=4, ffn=1024, positions=77, projection=256,
                                    seed=1, std=0.05),
            tokenizer=tok_l,
            text_encoder_2=clip_model(vocab, width=320, heads=5, layers=4, ffn=1280, positions=77, act="gelu",
                                      projection=320, seed=2, std=0.05),
            tokenizer_2=tok_g,
            text_encoder_3=t5_model(t5_vocab, d_model=256, d_kv=64, heads=4, d_ff=1024, layers=4, seed=3, std=0.05),
            tokenizer_3=tok_t5)
        ours = setups.load_ours(pipe, mj.load_text_encoders)

    n = a.t5_length

    def theirs():
        with torch.inference_mode():
            ctx, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=n,
                                                   do_classifier_free_guidance=False)
        return ctx, pooled

    def mine():
        return common.block(ours(PROMPTS, max_sequence_length=n))

    (ctx, pooled), compile_s = common.timed(mine)
    ctx_ref, pooled_ref = theirs()
    err = max(float(np.abs(np.asarray(o) - r.numpy()).max() / np.abs(r.numpy()).max())
              for o, r in ((ctx, ctx_ref), (pooled, pooled_ref)))
    print(f"text: max rel err vs diffusers {err:.2e}; first call {compile_s:.1f}s", flush=True)
    if err > 1e-4:
        raise SystemExit(f"prompt embeddings disagree ({err:.2e})")
    fns = {"ours": mine, "diffusers": theirs}
    res = {"case": f"sd3 3 encoders, 2 prompts, T5 {n}", "what": "text_encode", "parity_rel_err": err,
           "loadavg_start": load0, "ours_first_call_s": compile_s, "settings": common.settings()}
    res["timing"] = common.interleaved(fns, reps=a.reps, warmup=1, progress="text")
    common.emit(res)


if __name__ == "__main__":
    main()
