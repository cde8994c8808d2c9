"""Attention kernels on whatever backend is present, forward + backward of one joint attention at
FLUX-like shapes (24 heads of 128, 512 text tokens + the image tokens of 512x512 and 1024x1024 images):

- XLA one-shot versus query-chunked (mmdit_jax.attention.AttentionConfig's threshold and chunk size):
  median seconds per call and the compiled program's temporary bytes;
- splash block sizes (TPU only; skipped with a note elsewhere).

`--tiny` runs 2 heads of 32 over a few hundred tokens with chunking forced, in seconds on a CPU.

    python benchmarks/attention_kernels.py [--tiny] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's mmdit_jax, never a stale installed copy
    sys.path.insert(0, ROOT)

FLUX_TEXT = 512
SPLASH_BLOCKS = ((128, 128, 128), (256, 256, 256), (512, 512, 512), (512, 1024, 512), (1024, 1024, 512))


def _cases(tiny: bool):
    """(name, batch, length, heads, head_dim)."""
    if tiny:
        return [("tiny-256", 1, 64 + 256, 2, 32)]
    return [(f"flux-{side}", 1, FLUX_TEXT + (side // 16) ** 2, 24, 128) for side in (512, 1024)]


def _measure(fn, args, reps):
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), (mem.temp_size_in_bytes if mem is not None else None)


def _fwd_bwd(backend):
    import jax
    import jax.numpy as jnp

    from mmdit_jax.attention import attention

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, backend=backend).astype(jnp.float32) * jnp.cos(q.astype(jnp.float32)))

    return jax.grad(loss, (0, 1, 2))


def run(tiny: bool, reps: int = 3) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmdit_jax.attention import AttentionConfig, _query_chunks, attention_config

    platform = jax.default_backend()
    rows = []
    for name, b, length, h, d in _cases(tiny):
        r = np.random.default_rng(0)
        q, k, v = (jnp.asarray(r.standard_normal((b, length, h, d)), jnp.float32) for _ in range(3))
        square = b * h * length * length * 4
        # tiny shapes sit below the default threshold: force four chunks there
        chunked = (AttentionConfig(chunk_threshold=0, chunk_bytes=-(-square // 4)) if tiny
                   else AttentionConfig(chunk_threshold=0))
        for variant, cfg in (("one-shot", AttentionConfig(chunk_threshold=1 << 62)), ("chunked", chunked)):
            with attention_config(cfg):
                chunks = _query_chunks(q, k)
                try:
                    sec, temp = _measure(_fwd_bwd("xla"), (q, k, v), reps)
                except Exception as e:  # e.g. out of memory one-shot at large sizes
                    sec, temp = None, None
                    print(f"  {name} xla {variant}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append(dict(section="xla", case=name, variant=f"{variant} ({chunks} chunk{'s' * (chunks > 1)})",
                             platform=platform, seconds=sec, temp_bytes=temp, logits_bytes=square, chunks=chunks))
        if platform != "tpu":
            continue
        qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
        for bq, bkv, bkc in SPLASH_BLOCKS:
            cfg = AttentionConfig(splash_block_q=bq, splash_block_kv=bkv, splash_block_kv_compute=bkc)
            with attention_config(cfg):
                sec, temp = _measure(_fwd_bwd("splash"), (qb, kb, vb), reps)
            rows.append(dict(section="splash", case=name, variant=f"blocks q{bq} kv{bkv} kv_compute{bkc}",
                             platform=platform, seconds=sec, temp_bytes=temp, logits_bytes=square, chunks=1))
    if platform != "tpu":
        rows.append(dict(section="splash", case="-", variant="skipped: the splash kernel needs a TPU",
                         platform=platform, seconds=None, temp_bytes=None, logits_bytes=None, chunks=None))
    return rows


def table(rows: list[dict]) -> str:
    def mib(x):
        return "-" if x is None else f"{x / 2 ** 20:.1f}"

    lines = [f"{'section':8} {'case':10} {'variant':36} {'platform':8} {'fwd+bwd ms':>11} {'temp MiB':>9} "
             f"{'L^2 MiB':>8}"]
    for r in rows:
        ms = "-" if r["seconds"] is None else f"{r['seconds'] * 1e3:.1f}"
        lines.append(f"{r['section']:8} {r['case']:10} {r['variant']:36} {r['platform']:8} {ms:>11} "
                     f"{mib(r['temp_bytes']):>9} {mib(r['logits_bytes']):>8}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(table(run(a.tiny, a.reps)), flush=True)


if __name__ == "__main__":
    main()
