"""benchmarks/attention_kernels.py in tiny mode: both XLA variants measured, chunking visible in the compiled
temporary memory, the splash section skipped with a note off TPU."""
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import attention_kernels  # noqa: E402


def test_attention_kernels_benchmark_tiny():
    rows = attention_kernels.run(tiny=True, reps=1)
    one, chunked = [r for r in rows if r["section"] == "xla"]
    assert (one["chunks"], chunked["chunks"]) == (1, 4)
    assert one["seconds"] > 0 and chunked["seconds"] > 0
    # one-shot holds at least one (B, H, L, L) float32 array; four chunks a fraction of it
    assert one["temp_bytes"] >= one["logits_bytes"] and chunked["temp_bytes"] < one["temp_bytes"] / 2
    splash = [r for r in rows if r["section"] == "splash"]
    assert jax.default_backend() != "tpu" and len(splash) == 1 and splash[0]["variant"].startswith("skipped")
    text = attention_kernels.table(rows)
    assert "chunked (4 chunks)" in text and "skipped: the splash kernel needs a TPU" in text
