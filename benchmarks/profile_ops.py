"""Where the time of a jitted transformer forward or gradient goes, by XLA operation kind.

Traces a few calls with `jax.profiler`, sums the executed thunks' durations by kind (matmuls, the
scan's stacking and slicing, copies and transposes, elementwise fusions) and prints the table, with
the compiled temporaries. Shows what to optimise in the library.

    python benchmarks/profile_ops.py --case sd3|flux [--what forward|grad] [--top 15]

On CPU, XLA runs independent thunks concurrently, so the kinds can add up to more than the wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import common  # noqa: F401  (puts this checkout first on sys.path)
import setups

KINDS = [  # first match wins; names are XLA's fusion/thunk names with the numeric suffix dropped
    ("matmul", re.compile(r"^(ynn_fusion|dot|onednn|custom-call|.*gemm|.*matmul)")),
    ("scan: stacked-buffer init", re.compile(r"^wrapped_broadcast")),
    ("scan: slice per layer", re.compile(r"dynamic-slice")),
    ("scan: write per layer", re.compile(r"dynamic-update-slice")),
    ("copy / transpose", re.compile(r"(copy|transpose)")),
    ("while-loop bookkeeping", re.compile(r"^while")),
    ("elementwise / reductions", re.compile(r"fusion|^(add|multiply|subtract|exp|concatenate|slice|pad|reduce)")),
]
SKIP = ("ThunkExecutor", "$", "Slinky", "end:", "PjitFunction", "CommonPjRt", "ParseArguments", "Handle inputs",
        "Allocate")


def kind(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    return next((k for k, pat in KINDS if pat.search(base)), "other")


def profile(fn, arg, calls: int = 3) -> tuple[dict, dict, float]:
    import jax

    jax.block_until_ready(fn(arg))  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(fn(arg))
        wall = (time.perf_counter() - t) / calls
        events = json.load(gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
    by_kind, by_op = collections.defaultdict(float), collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(SKIP):
            by_kind[kind(e["name"])] += e["dur"] * 1e-6 / calls
            by_op[e["name"]] += e["dur"] * 1e-6 / calls
    return by_kind, by_op, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="sd3", choices=sorted(setups.CASES))
    ap.add_argument("--what", default="grad", choices=["forward", "grad"])
    ap.add_argument("--top", type=int, default=12, help="also list the slowest single operations")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import mmdit_jax as mj

    case = setups.CASES[a.case]
    ours = mj.Transformer.init(setups.ours_config(case), seed=0)
    x = {k: jnp.asarray(v) for k, v in setups.inputs(case).items()}

    def loss(p):
        v = ours.apply(p, x["latents"], x["sigma"], x["context"], x["pooled"], x.get("guidance"))
        return jnp.mean(jnp.square(v))

    fn = jax.jit(loss if a.what == "forward" else jax.grad(loss))
    by_kind, by_op, wall = profile(fn, ours.params)
    temp = fn.lower(ours.params).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
    flops = setups.flops(case)["total"] * (1 if a.what == "forward" else 3)
    print(f"{a.case} {a.what}: {wall * 1e3:.0f} ms per call ({flops / wall / 1e9:.1f} GFLOP/s), "
          f"XLA temporaries {temp:.0f} MiB")
    print("| operation kind | ms per call | share of summed op time |\n|---|---|---|")
    total = sum(by_kind.values())
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v * 1e3:.1f} | {100 * v / total:.0f}% |")
    if a.top:
        print("\nslowest operations (ms per call, summed over scan iterations):")
        for name, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:a.top]:
            print(f"  {v * 1e3:7.1f}  {name}  [{kind(name)}]")


if __name__ == "__main__":
    main()
