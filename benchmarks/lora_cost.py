"""What LoRA costs and saves: adapter sizes and training-state memory for the released networks
(computed from shapes, nothing allocated), and step times on a small model.

    python benchmarks/lora_cost.py [--sizes] [--steps] [--rank 16]
"""
import argparse
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import mmdit_jax as mj
from mmdit_jax import lora as L

GIB = 1024 ** 3


def sizes(rank: int):
    print("| preset | base params | targets | rank | adapter params | full finetune state (f32 "
          "params+grads+Adam) | LoRA state (bf16 base + f32 adapter, grads, Adam) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("sd3.5-medium", "sd3.5-large", "flux-dev"):
        cfg = mj.preset(name)
        n = mj.count_params(cfg)
        for targets in ("attn", "attn_mlp", "all"):
            lo = jax.eval_shape(lambda: L.init_lora(cfg, L.LoraConfig(targets=targets, rank=rank)))
            a = sum(math.prod(x.shape) for x in jax.tree.leaves(lo))
            print(f"| {name} | {n / 1e9:.2f} B | {targets} | {rank} | {a / 1e6:.1f} M ({100 * a / n:.2f}%) "
                  f"| {16 * n / GIB:.1f} GiB | {(2 * n + 16 * a) / GIB:.1f} GiB |")


def _timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def steps(rank: int):
    cfg = mj.MMDiTConfig(num_layers=6, num_heads=4, head_dim=64, context_dim=256, pooled_dim=128,
                         pos_embed_max_size=32, qk_norm=True)
    tm = mj.Transformer.init(cfg, seed=0)
    params = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), tm.params)
    r = np.random.default_rng(0)
    x = (r.standard_normal((2, 32, 32, 16), np.float32), np.full((2,), 0.5, np.float32),
         r.standard_normal((2, 77, 256), np.float32), r.standard_normal((2, 128), np.float32))
    lora = L.init_lora(cfg, L.LoraConfig(targets="attn_mlp", rank=rank), seed=1)
    lora = jax.tree.map(lambda a: a + 0.01, lora)
    mse = lambda out: jnp.mean(out.astype(jnp.float32) ** 2)
    rows = [
        ("forward, no adapter", jax.jit(lambda p: tm.apply(p, *x)), (params,)),
        ("forward, merged adapter (merge included)",
         jax.jit(lambda p, lo: L.apply_lora(tm, p, lo, *x, merged=True)), (params, lora)),
        ("forward, unmerged adapter", jax.jit(lambda p, lo: L.apply_lora(tm, p, lo, *x)), (params, lora)),
        ("grad, full finetune", jax.jit(jax.grad(lambda p: mse(tm.apply(p, *x)))), (params,)),
        ("grad, adapter only (dropout 0.1)", jax.jit(jax.grad(lambda lo, p: mse(L.apply_lora(
            tm, p, lo, *x, dropout=0.1, rng=jax.random.key(0))))), (lora, params)),
    ]
    print(f"Small SD3-layout model: 6 blocks, width 256, 32x32 latent, 77 text tokens, batch 2, "
          f"attn_mlp rank {rank}; {platform.machine()} CPU, {jax.devices()[0].platform}; min of 5")
    print("| step | seconds |")
    print("|---|---|")
    for name, fn, args in rows:
        print(f"| {name} | {_timed(fn, *args):.4f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", action="store_true")
    ap.add_argument("--steps", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    if a.sizes or not a.steps:
        sizes(a.rank)
    if a.steps or not a.sizes:
        steps(a.rank)


if __name__ == "__main__":
    main()
