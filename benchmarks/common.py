"""Shared measuring tools for the benchmarks that pit this project against diffusers on one machine.

- `interleaved`: runs the contenders alternately (ours, theirs, ours, ...) after warm-up calls and
  reports medians, so a burst of load from elsewhere hits both sides alike.
- `working_set_mib`: peak resident memory a call adds on top of what the process already holds
  (Linux: the peak counter VmHWM is reset through /proc/self/clear_refs before the call).
- `matmul_peak`: the machine's dense float32 matmul rate measured through each framework.
- `flops_*`: analytic FLOP counts (per block 24*D^2*S + 4*D*S^2 forward, S the joint sequence).
- `emit`: the one JSON line run_all.py collects from each comparison's process.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's mmdit_jax, never a stale installed copy
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

RESULT_TAG = "BENCH_RESULT "


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings() -> dict:
    """Versions and thread settings of both frameworks, recorded next to every number."""
    import diffusers
    import flax
    import jax
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            # XLA:CPU runs one intra-op Eigen pool sized to the visible cores unless XLA_FLAGS say so
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_devices": len(jax.devices()),
            "jax_backend": jax.default_backend()}


def block(x):
    """Waits for JAX arrays (torch CPU calls are synchronous already)."""
    import jax

    return jax.block_until_ready(x)


def interleaved(fns: dict, reps: int = 5, warmup: int = 1, progress: str = "") -> dict:
    """Median seconds per call for each callable, calls interleaved across contenders."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
        if progress:
            done = time.perf_counter() - start
            print(f"  {progress}: rep {i + 1}/{reps}, {done:.1f}s, ETA {done / (i + 1) * (reps - i - 1):.0f}s",
                  flush=True)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v}
            for k, v in samples.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def working_set_mib(fn) -> float | None:
    """Peak RSS during `fn()` minus the RSS before it, in MiB (activations and temporaries of one call;
    weights and compiled code are already resident). None where the peak counter cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def timed(fn):
    """(result, seconds) of one call."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def matmul_peak(sizes=(1024, 2048, 3072), reps: int = 5) -> dict:
    """Dense float32 square-matmul FLOP/s through torch and through XLA, best size of each.

    Utilisation is reported against the higher of the two: the machine's rate, not one library's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    out = {"torch": {}, "jax": {}}
    dot = jax.jit(jnp.dot)
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        ta, ja = torch.from_numpy(a), jnp.asarray(a)
        res = interleaved({"torch": lambda: torch.mm(ta, ta), "jax": lambda: block(dot(ja, ja))},
                          reps=reps, warmup=2)
        for k in out:
            out[k][n] = 2 * n ** 3 / res[k]["median_s"]
    best = {k: max(v.values()) for k, v in out.items()}
    return {"torch_flops": best["torch"], "jax_flops": best["jax"], "peak_flops": max(best.values()),
            "by_size": {k: {str(n): f for n, f in v.items()} for k, v in out.items()}}


PROBE_N = 2048


def matmul_probes(n: int = PROBE_N) -> dict:
    """One n x n float32 matmul per framework, to time alongside a comparison's calls: on a shared
    machine the rate the matmuls get at the same moment is the fair denominator for utilisation."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta, ja, dot = torch.from_numpy(a), jnp.asarray(a), jax.jit(jnp.dot)
    return {"peak_torch": lambda: torch.mm(ta, ta), "peak_jax": lambda: block(dot(ja, ja))}


def probe_peak(timing: dict, n: int = PROBE_N) -> float | None:
    """The higher matmul rate of the probes in `timing` (FLOP/s), if they were timed."""
    rates = [2 * n ** 3 / timing[k]["median_s"] for k in ("peak_torch", "peak_jax") if k in timing]
    return max(rates) if rates else None


# ---- analytic FLOP counts (a multiply-add is 2 FLOPs) ----

def _block(d: int, s: int) -> float:
    """One transformer block over a joint sequence of s tokens: qkv (3), out proj (1), MLP (4+4) are
    12*d*d multiply-adds per token; q k^T and probs v are 2*s*d each per token."""
    return 24 * d * d * s + 4 * d * s * s


def flops_sd3(cfg, batch: int, img_tokens: int, txt_tokens: int) -> dict:
    """MMDiT forward. Joint blocks follow the formula over S = txt + img; the last block's context
    stream is pre-only (qkv only: 6*d*d*txt instead of 24); dual-attention blocks add an x-only
    attention (8*d*d*img + 4*d*img^2). Embedders, adaLN and the final layer are counted separately."""
    d, s = cfg.hidden_size, img_tokens + txt_tokens
    blocks = 0.0
    for dual, pre_only in cfg.block_kinds():
        blocks += _block(d, s) - (18 * d * d * txt_tokens if pre_only else 0)
        if dual:
            blocks += 8 * d * d * img_tokens + 4 * d * img_tokens ** 2
    p = cfg.patch_size
    n_mod = sum((9 if dual else 6) + (2 if pre_only else 6) for dual, pre_only in cfg.block_kinds())
    other = (2 * p * p * cfg.in_channels * d * img_tokens + 2 * cfg.context_dim * d * txt_tokens
             + 2 * (256 + cfg.pooled_dim + 2 * d) * d  # t and y embedders, per example
             + 2 * d * d * (n_mod + 2)  # adaLN linears, per example
             + 2 * d * p * p * cfg.out_channels * img_tokens)
    return {"blocks": batch * blocks, "other": batch * other, "total": batch * (blocks + other)}


def flops_flux(cfg, batch: int, img_tokens: int, txt_tokens: int) -> dict:
    """FLUX forward. Double blocks follow the formula over S = txt + img. A single block's linear1
    (d -> 3d + 4d) and linear2 (d + 4d -> d) are 7*d*d + 5*d*d = 12*d*d multiply-adds per token, the
    same 24*d*d*S as a double block's qkv + proj + MLP, plus the same attention 4*d*S^2."""
    d, s = cfg.hidden_size, img_tokens + txt_tokens
    mlp = cfg.mlp_hidden
    single = 2 * (d * (3 * d + mlp) + (d + mlp) * d) * s + 4 * d * s * s
    blocks = cfg.depth * _block(d, s) + cfg.depth_single * single
    n_mod = 12 * cfg.depth + 3 * cfg.depth_single + 2
    embed = 256 + (256 if cfg.guidance_embed else 0) + cfg.pooled_dim
    other = (2 * cfg.in_channels * d * img_tokens + 2 * cfg.context_dim * d * txt_tokens
             + 2 * (embed + 2 * d + (d if cfg.guidance_embed else 0)) * d + 2 * d * d * n_mod
             + 2 * d * cfg.out_channels * img_tokens)
    return {"blocks": batch * blocks, "other": batch * other, "total": batch * (blocks + other)}


def flops_flux2(cfg, batch: int, img_tokens: int, txt_tokens: int) -> dict:
    """FLUX.2 forward. A double block's stream is qkv (3d) + proj (d) + SwiGLU in (2m) and out (m) per
    token; a single block's linear1 (d -> 3d + 2m) and linear2 (d + m -> d); both add attention's 4*d*S^2.
    The modulations are three shared projections (6d, 6d, 3d) and the final layer's (2d), once per
    sample; no Linear has a bias."""
    d, s, m = cfg.hidden_size, img_tokens + txt_tokens, cfg.mlp_hidden
    double = 2 * (4 * d * d + 3 * m * d) * s + 4 * d * s * s
    single = 2 * (d * (3 * d + 2 * m) + (d + m) * d) * s + 4 * d * s * s
    blocks = cfg.depth * double + cfg.depth_single * single
    embed = 2 * (cfg.time_channels * d + d * d) * (2 if cfg.guidance_embed else 1)
    other = (2 * cfg.in_channels * d * img_tokens + 2 * cfg.context_dim * d * txt_tokens + embed
             + 2 * d * d * (6 + 6 + 3 + 2) + 2 * d * cfg.out_channels * img_tokens)
    return {"blocks": batch * blocks, "other": batch * other, "total": batch * (blocks + other)}


def emit(result: dict) -> None:
    """Prints a readable summary, then the result as one tagged JSON line (run_all.py reads it)."""
    result.setdefault("loadavg_end", loadavg())
    timing = result.get("timing", {})
    if "ours" in timing:
        ours = timing["ours"]["median_s"]
        line = ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms ({v['median_s'] / ours:.2f}x ours)"
                         for k, v in timing.items() if k != "ours" and not k.startswith("peak"))
        print(f"{result.get('what')} {result.get('case')}: ours {ours * 1e3:.1f} ms; {line}; "
              f"load {result.get('loadavg_start')} -> {result['loadavg_end']}", flush=True)
    print(RESULT_TAG + json.dumps(result), flush=True)
