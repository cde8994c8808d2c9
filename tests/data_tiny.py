"""Tiny diffusers pipelines (VAE + text encoders; no transformer, which the data pipeline never loads) and
image-caption folders built on the spot for the data tests."""
import os

import numpy as np
from PIL import Image

from conftest import randomize_torch_
from text_tiny import WORDS, clip_model, make_t5_tokenizer, t5_model, write_clip_tokenizer


def tiny_vae(seed, scale=1.5305, shift=0.0609):
    """16 latent channels, one downsampling (latents are half the image size)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=16,
                        scaling_factor=scale, shift_factor=shift, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return randomize_torch_(vae, std=0.15, seed=seed)


def sd3_pipeline(tmp, with_t5=True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok_l, vocab = write_clip_tokenizer(os.path.join(tmp, "tl"), 12)
    tok_g, _ = write_clip_tokenizer(os.path.join(tmp, "tg"), 12, pad_token="!")
    tok_t5, t5_vocab = make_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(8),
        text_encoder=clip_model(vocab, width=24, heads=2, projection=20, seed=9, positions=12), tokenizer=tok_l,
        text_encoder_2=clip_model(vocab, width=32, heads=2, layers=2, act="gelu", projection=28, seed=10,
                                  positions=12),
        tokenizer_2=tok_g, text_encoder_3=t5_model(t5_vocab, d_model=64, seed=11) if with_t5 else None,
        tokenizer_3=tok_t5 if with_t5 else None)


def flux_pipeline(tmp):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok_l, vocab = write_clip_tokenizer(os.path.join(tmp, "tl"), 12)
    tok_t5, t5_vocab = make_t5_tokenizer()
    return FluxPipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=tiny_vae(13, 0.3611, 0.1159), text_encoder=clip_model(vocab, width=24, heads=2, seed=14, positions=12),
        tokenizer=tok_l, text_encoder_2=t5_model(t5_vocab, d_model=40, seed=15), tokenizer_2=tok_t5)


def save(pipe, folder):
    pipe.save_pretrained(folder)
    return folder


def caption(rng):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))


def write_image(path, h, w, rng, fmt="PNG"):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, fmt)
    return img


def image_folder(root, sizes, seed=0, captions=True):
    """Images `{i:03d}.png` of the given (h, w) sizes with random captions; returns {key: caption}."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i, (h, w) in enumerate(sizes):
        key = f"{i:03d}.png"
        write_image(os.path.join(root, key), h, w, rng)
        out[key] = caption(rng)
        if captions:
            with open(os.path.join(root, f"{i:03d}.txt"), "w") as f:
                f.write(out[key] + "\n")
    return out


def add_broken(root):
    """A file that is no image at all and a PNG cut in half (readable header, undecodable data)."""
    with open(os.path.join(root, "broken.png"), "wb") as f:
        f.write(b"this is not an image")
    rng = np.random.default_rng(99)
    full = os.path.join(root, "zz_truncated.png")
    write_image(full, 32, 32, rng)
    data = open(full, "rb").read()
    with open(full, "wb") as f:
        f.write(data[:len(data) // 2])
    for name in ("broken", "zz_truncated"):
        with open(os.path.join(root, name + ".txt"), "w") as f:
            f.write("a red cat")
    return ("broken.png", "zz_truncated.png")


class StandInToy:
    """The documented toy interface (a grain random-access source of {image uint8 (R, R, 3), caption}),
    deterministic by index; stands in for mmdit_jax.toy until it is merged."""

    def __init__(self, resolution=32, seed=0, length=40):
        self.resolution, self.seed, self.length = resolution, seed, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, int(i)])
        r = self.resolution
        return {"image": rng.integers(0, 256, (r, r, 3), dtype=np.uint8), "caption": caption(rng)}
