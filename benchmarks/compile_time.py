"""Compile time versus depth: with scanned stacks a deep model compiles about as fast as a shallow one.

Lowers and compiles the forward and the gradient of SD3-layout models of several depths from abstract
parameters (nothing is allocated), and prints a markdown table.

    python benchmarks/compile_time.py [--width 4] [--depths 2,24]
"""
import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp

import mmdit_jax as mj
from mmdit_jax.transformer import Transformer, abstract_module
from flax import nnx


def compile_seconds(cfg, grad: bool, h=32, w=32, text=77, batch=1, repeats=3):
    tm = Transformer(cfg, params=None)  # structure only; parameters stay abstract
    params = nnx.state(abstract_module(cfg)).to_pure_dict()
    s = jax.ShapeDtypeStruct
    args = (s((batch, h, w, cfg.in_channels), jnp.float32), s((batch,), jnp.float32),
            s((batch, text, cfg.context_dim), jnp.float32), s((batch, cfg.pooled_dim), jnp.float32))
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
    ap.add_argument("--heads", type=int, default=4, help="heads of 64 (24 = SD3-medium width)")
    ap.add_argument("--depths", default="2,8,24")
    ap.add_argument("--preset", default="sd3.5-medium", help="layout (qk-norm, dual layers) to copy")
    a = ap.parse_args()
    base = mj.preset(a.preset)
    print(f"machine: {platform.machine()} {jax.default_backend()}, jax {jax.__version__}")
    print(f"layout {a.preset}, width {a.heads}x64, 32x32 latent, 77 text tokens\n")
    print("| depth | stacks | forward compile s | grad compile s |")
    print("|---|---|---|---|")
    for depth in map(int, a.depths.split(",")):
        dual = tuple(i for i in base.dual_attention_layers if i < depth - 1)
        cfg = dataclasses.replace(base, num_layers=depth, num_heads=a.heads, dual_attention_layers=dual)
        f = compile_seconds(cfg, False)
        g = compile_seconds(cfg, True)
        print(f"| {depth} | {len(cfg.groups())} | {f:.2f} | {g:.2f} |")


if __name__ == "__main__":
    main()
