"""Memory of a tiled versus an untiled VAE decode at full size (FLUX/SD3 VAE, random weights).

Reports XLA's compiled memory estimate (temporaries) for one tile and for the whole image without
running anything; `--run` also decodes the image tiled and reports wall time and peak RSS.

    python benchmarks/vae_tiled_decode.py [--size 2048] [--tile 512] [--run]
"""
import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.vae import VAE
from mmdit_jax.vae.loader import _network
from mmdit_jax.vae.config import vae_preset


def temp_gib(fn, params, shape):
    compiled = jax.jit(fn).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels")
    ap.add_argument("--run", action="store_true", help="also run the tiled decode")
    a = ap.parse_args()
    cfg = vae_preset("flux")
    vae = VAE.init(cfg, seed=0)
    net = _network(cfg, vae.dtype)
    lat = a.size // 8
    print(f"{jax.default_backend()}, jax {jax.__version__}: {a.size}x{a.size} decode, {a.tile}px tiles")
    print(f"XLA temporaries, one tile:     {temp_gib(net.raw_decode, vae.params, (1, a.tile // 8, a.tile // 8, 16)):.2f} GiB")
    print(f"XLA temporaries, whole image:  {temp_gib(net.raw_decode, vae.params, (1, lat, lat, 16)):.2f} GiB")
    if a.run:
        z = np.random.default_rng(0).standard_normal((1, lat, lat, 16)).astype(np.float32)
        t = time.perf_counter()
        img = vae.decode_tiled(z, tile_size=a.tile)
        dt = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"tiled decode: {dt:.1f} s, output {img.shape}, finite {bool(np.isfinite(img).all())}, "
              f"peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
