"""VAE decode: mj.load_vae(...).decode (jitted) versus diffusers AutoencoderKL.decode, same weights.

A 16-channel KL-VAE of the SD3/FLUX architecture at reduced width (levels 32, 64, 128, 128 channels
instead of 128, 256, 512, 512) so a CPU run stays short; latents 32x48 -> 256x384 images.

    python benchmarks/vae_decode.py [--batch 1] [--reps 5]
"""
import argparse

import numpy as np

import common

SCALE, SHIFT = 1.5305, 0.0609


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--channels", default="32,64,128,128")
    a = ap.parse_args()

    import torch
    from diffusers import AutoencoderKL

    import mmdit_jax as mj
    import setups

    load0 = common.loadavg()
    chans = tuple(int(c) for c in a.channels.split(","))
    torch.manual_seed(0)
    ref = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=chans,
                        down_block_types=("DownEncoderBlock2D",) * len(chans),
                        up_block_types=("UpDecoderBlock2D",) * len(chans), layers_per_block=2,
                        latent_channels=16, norm_num_groups=32, scaling_factor=SCALE, shift_factor=SHIFT,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    ours = setups.load_ours(ref, mj.load_vae)
    z = np.random.default_rng(0).standard_normal((a.batch, 32, 48, 16), dtype=np.float32)
    tz = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous() / SCALE + SHIFT

    def theirs():
        with torch.inference_mode():
            return ref.decode(tz).sample

    def mine():
        return common.block(ours.decode(z))

    out, compile_s = common.timed(mine)
    img = theirs().permute(0, 2, 3, 1).numpy()
    err = float(np.abs(np.asarray(out) - img).max() / np.abs(img).max())
    print(f"vae: max rel err vs diffusers {err:.2e}; first call {compile_s:.1f}s", flush=True)
    if err > 1e-4:
        raise SystemExit(f"decoded images disagree ({err:.2e})")
    fns = {"ours": mine, "diffusers": theirs}
    res = {"case": f"{chans} b{a.batch} 32x48", "what": "vae_decode", "parity_rel_err": err,
           "loadavg_start": load0, "ours_first_call_s": compile_s, "settings": common.settings()}
    res["timing"] = common.interleaved(fns, reps=a.reps, warmup=1, progress="vae decode")
    common.emit(res)


if __name__ == "__main__":
    main()
