"""Compile time versus depth: with scanned stacks a deep model compiles about as fast as a shallow one.

Lowers and compiles the forward and the gradient of SD3- or FLUX-layout models of several depths from
abstract parameters (nothing is allocated), and prints a markdown table. For FLUX, depth d means d
double blocks and 2d single blocks (FLUX.1's ratio: 19 + 38).

    python benchmarks/compile_time.py [--heads 4] [--depths 2,24] [--preset sd3.5-medium|flux-dev]
"""
import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp

import common  # noqa: F401  (this checkout's mmdit_jax)
import mmdit_jax as mj
from mmdit_jax.transformer import Transformer, abstract_module
from flax import nnx


def compile_seconds(cfg, grad: bool, h=32, w=32, text=77, batch=1, repeats=3):
    tm = Transformer(cfg, params=None)  # structure only; parameters stay abstract
    params = nnx.state(abstract_module(cfg)).to_pure_dict()
    s = jax.ShapeDtypeStruct
    latent_ch = getattr(cfg, "latent_channels", cfg.in_channels)  # FLUX's in_channels are packed 2x2
    args = (s((batch, h, w, latent_ch), jnp.float32), s((batch,), jnp.float32),
            s((batch, text, cfg.context_dim), jnp.float32), s((batch, cfg.pooled_dim), jnp.float32))
    if getattr(cfg, "guidance_embed", False):
        args += (s((batch,), jnp.float32),)
    fn = tm.apply
    if grad:
        fn = jax.grad(lambda p, *a: jnp.sum(tm.apply(p, *a)))
    best = float("inf")
    for _ in range(repeats):  # min of several: compile time is single-threaded and noisy
        jax.clear_caches()
        t = time.perf_counter()
        jax.jit(fn).lower(params, *args).compile()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=4, help="heads (of 64 for SD3, 128 for FLUX)")
    ap.add_argument("--depths", default="2,8,24")
    ap.add_argument("--preset", default="sd3.5-medium", help="layout (qk-norm, dual layers) to copy")
    ap.add_argument("--repeats", type=int, default=3, help="compiles per entry (the minimum is kept)")
    a = ap.parse_args()
    base = mj.preset(a.preset)
    flux = base.family == "flux"
    print(f"machine: {platform.machine()} {jax.default_backend()}, jax {jax.__version__}")
    print(f"layout {a.preset}, width {a.heads}x{base.head_dim}, 32x32 latent, 77 text tokens\n")
    print("| depth | stacks | forward compile s | grad compile s |")
    print("|---|---|---|---|")
    rows = []
    for depth in map(int, a.depths.split(",")):
        if flux:
            cfg = dataclasses.replace(base, depth=depth, depth_single=2 * depth, num_heads=a.heads)
            stacks = 2
        else:
            dual = tuple(i for i in base.dual_attention_layers if i < depth - 1)
            cfg = dataclasses.replace(base, num_layers=depth, num_heads=a.heads, dual_attention_layers=dual)
            stacks = len(cfg.groups())
        f = compile_seconds(cfg, False, repeats=a.repeats)
        g = compile_seconds(cfg, True, repeats=a.repeats)
        rows.append({"depth": depth, "stacks": stacks, "forward_s": f, "grad_s": g})
        print(f"| {depth} | {stacks} | {f:.2f} | {g:.2f} |", flush=True)
    common.emit({"what": "compile_time", "case": a.preset, "heads": a.heads, "repeats": a.repeats, "rows": rows})

if __name__ == "__main__":
    main()
