"""Training-step throughput: the jitted, donated train step (AdamW + EMA, float32 masters) on synthetic
encoded batches, for a family preset narrowed to a few blocks, per compute dtype and remat policy.

    python benchmarks/trainer_step.py [--preset sd3-medium] [--layers 2] [--width 4] [--batch 2]
        [--latent 32] [--text 77] [--dtypes float32,bfloat16] [--remats none,full] [--steps 5]
"""
import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import mmdit_jax as mj
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.config import ModelConfig, TrainConfig
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import jit_train_step


def narrowed(preset, layers, width):
    cfg = mj.preset(preset)
    if cfg.family == "sd3":
        dual = tuple(i for i in cfg.dual_attention_layers if i < layers - 1)
        return dataclasses.replace(cfg, num_layers=layers, num_heads=width, dual_attention_layers=dual)
    return dataclasses.replace(cfg, depth=layers, depth_single=2 * layers, num_heads=width)


def measure(net, dtype, remat, batch, latent, text, steps):
    cfg = TrainConfig(model=ModelConfig(preset="sd3-medium", compute_dtype=dtype, remat=remat), batch_size=batch)
    model = mj.Transformer(net, None)
    tx = make_optimizer(cfg.optim, 1000, model.trainable_mask())
    mesh = make_mesh({"fsdp": -1})
    state, sh = create_state(model, tx, mesh, 0, True)
    step = jit_train_step(model, tx, cfg, mesh, sh)
    r = np.random.default_rng(0)
    ch = getattr(net, "latent_channels", None) or net.in_channels
    b = dict(latents=r.standard_normal((batch, latent, latent, ch), np.float32),
             context=r.standard_normal((batch, text, net.context_dim), np.float32),
             pooled=r.standard_normal((batch, net.pooled_dim), np.float32))
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b)
    jax.block_until_ready(m)
    return first, steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sd3-medium")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=4, help="attention heads (x the preset's head dim)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--text", type=int, default=77)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--remats", default="none,full")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    net = narrowed(a.preset, a.layers, a.width)
    print(f"{a.preset} narrowed: {mj.count_params(net) / 1e6:.1f} M params; batch {a.batch}, latent "
          f"{a.latent}x{a.latent}, {a.text} text tokens; {jax.devices()[0].device_kind} "
          f"({platform.machine()}), jax {jax.__version__}")
    print("| compute dtype | remat | first step s (compile) | steps/s | images/s |\n|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        for remat in a.remats.split(","):
            first, rate = measure(net, dtype, remat, a.batch, a.latent, a.text, a.steps)
            print(f"| {dtype} | {remat} | {first:.1f} | {rate:.2f} | {rate * a.batch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
