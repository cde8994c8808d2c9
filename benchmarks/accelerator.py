"""The accelerator benchmark in one unattended command, for one H100/H200 (bfloat16, released sizes,
random weights):

    python benchmarks/accelerator.py [--out accelerator.jsonl] [--budget_s 470] [--sections a,b]
    python benchmarks/accelerator.py --tiny     # every section at tiny sizes on CPU (the test suite's check)

Sections (SECTIONS below, run in order, each a function `run(tiny) -> rows`, a list of flat dicts):
- flux_sampling: FLUX.1-dev at 1024x1024, 28 Euler steps, one image: our jitted loop against diffusers
  eager and torch.compile on the same GPU (benchmarks/sampling_loop.py, with its parity check);
- sd35_medium_train: SD3.5-medium full training steps at 1024x1024 (AdamW, float32 masters, EMA) with MFU
  (benchmarks/trainer_step.py);
- flux_lora_train: FLUX.1-dev rank-16 attention LoRA on a frozen bfloat16 base at 1024x1024, with MFU;
- attention: the XLA kernel one-shot and query-chunked (and splash block sizes on a TPU), forward +
  backward at FLUX's joint lengths, with compiled temporary bytes (benchmarks/attention_kernels.py).
Another section is one more (name, function) pair in SECTIONS.

On an accelerator each section runs in its own process, so a failure or an out-of-memory in one leaves
the others their whole device; a section that fails is reported as a row with its error and the run
goes on; a section still running at --budget_s is stopped, and one with under a minute left is skipped
(both say so in their row). Rows are appended
to --out as JSON lines and printed as one markdown table per section at the end.

Besides what such a machine has (jax with CUDA, flax, optax, orbax, torch, transformers) it needs the
pure-Python wheels listed in benchmarks/RESULTS.md ("Accelerator benchmark").
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _setup_env(tiny: bool) -> None:
    """Before JAX starts: its platform, and no up-front grab of the GPU (torch shares it)."""
    if tiny:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cuda")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not tiny and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        # one fresh cache per run (inherited by the sections' processes): a program compiled twice, as
        # sampling_loop's memory analysis does, is compiled once; first-call times stay cold
        import tempfile

        os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="accelerator_jax_cache_"),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)


# ---- sections ----------------------------------------------------------------------------------------

def flux_sampling(tiny: bool) -> list[dict]:
    import sampling_loop

    if tiny:
        argv = ["--case", "flux-tiny", "--steps", "1", "--reps", "1", "--compile", "--compile_backend", "eager"]
    else:
        argv = ["--case", "flux-dev-1024", "--steps", "28", "--reps", "2", "--dtype", "bfloat16",
                "--torch_device", "cuda", "--compile"]
    res = sampling_loop.run(argv)
    ours = res["timing"]["ours"]["median_s"]
    first = {"ours": res["ours_first_call_s"], "diffusers_compiled": res.get("torch_compile_first_call_s")}
    rows = []
    for name in ("ours", "diffusers", "diffusers_compiled"):
        t = res["timing"][name]["median_s"]
        rows.append({"case": res["case"], "steps": res["steps"], "contender": name, "latency_s": round(t, 3),
                     "x_ours": round(t / ours, 2), "first_call_s": round(first.get(name) or 0.0, 1),
                     "parity_rel_err": f"{res['parity_rel_err']:.1e}", "dtype": res["dtype"]})
    return rows


def _train(tiny: bool, preset: str, lora_rank: int) -> list[dict]:
    import common
    import trainer_step

    if tiny:
        net = trainer_step.narrowed(preset, 1, 1)
        dtype, batch, latent, text, steps, remats = "float32", 2, 8, 8, 1, ("dots",)
    else:
        net = trainer_step.narrowed(preset, 0, 0)
        # 1024x1024 images: 128x128 latents; text as the trainer feeds it (SD3: 77 CLIP + 256 T5 rows)
        text = 333 if net.family == "sd3" else 512
        dtype, batch, latent, steps = "bfloat16", 1, 128, 5
        remats = ("dots", "full")  # the next one only when the previous one runs out of memory
    p = net.patch_size if net.family == "sd3" else 2
    fwd = (common.flops_sd3 if net.family == "sd3" else common.flops_flux)(net, batch, (latent // p) ** 2, text)
    # model FLOPs: forward + backward; a frozen base has no weight gradients, so LoRA's backward is ~1x
    flops = (2 if lora_rank else 3) * fwd["total"]
    peak, source = trainer_step.device_peak(dtype, 1.0 if tiny else None)  # tiny: a stand-in peak, not measured
    for remat in remats:
        try:
            first, rate = trainer_step.measure(net, dtype, remat, batch, latent, text, steps, lora_rank=lora_rank)
        except Exception as e:  # noqa: BLE001 - out of memory: the next remat policy saves more
            if remat == remats[-1] or "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"  {preset} remat {remat}: out of memory, trying the next policy", flush=True)
            continue
        return [{"model": preset, "training": f"LoRA r{lora_rank}" if lora_rank else "full", "dtype": dtype,
                 "remat": remat, "batch": batch, "latent": f"{latent}x{latent}", "text_tokens": text,
                 "first_step_s": round(first, 1), "steps_per_s": round(rate, 3),
                 "images_per_s": round(rate * batch, 3), "tflops": round(flops * rate / 1e12, 2),
                 "mfu": f"{100 * flops * rate / peak:.1f}% (of {peak / 1e12:.4g} TFLOP/s, {source})"}]
    return []


def sd35_medium_train(tiny: bool) -> list[dict]:
    return _train(tiny, "sd3.5-medium", 0)


def flux_lora_train(tiny: bool) -> list[dict]:
    return _train(tiny, "flux-dev", 16)


def attention(tiny: bool) -> list[dict]:
    """XLA attention one-shot against query-chunked (and splash block sizes on TPU), forward + backward
    at FLUX's 512x512 and 1024x1024 joint lengths (benchmarks/attention_kernels.py)."""
    import attention_kernels

    rows = attention_kernels.run(tiny, reps=1 if tiny else 3)
    # the driver names each row's section: the kernel's own section goes under "kernel"
    return [{("kernel" if k == "section" else k): v for k, v in r.items()} for r in rows]


SECTIONS = [("flux_sampling", flux_sampling), ("sd35_medium_train", sd35_medium_train),
            ("flux_lora_train", flux_lora_train), ("attention", attention)]


# ---- driver --------------------------------------------------------------------------------------------

def run_section(name: str, tiny: bool) -> list[dict]:
    """The section's rows, or one row with its error: a failing section never stops the others."""
    fn = dict(SECTIONS)[name]
    t = time.perf_counter()
    try:
        rows = fn(tiny)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        traceback.print_exc()
        rows = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}]
    took = time.perf_counter() - t
    return [dict(section=name, section_s=round(took, 1), **r) for r in rows]


def _in_subprocess(name: str, tiny: bool, timeout: float) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), f"--section_only={name}"] + (["--tiny"] if tiny else [])
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return [{"section": name, "error": f"stopped at the time budget ({timeout:.0f} s left)"}]
    sys.stdout.write(res.stdout)
    rows = [json.loads(line[len(TAG):]) for line in res.stdout.splitlines() if line.startswith(TAG)]
    return rows or [{"section": name, "error": f"the section's process exited {res.returncode} with no rows"}]


TAG = "ACCEL_ROW "
MIN_SECTION_S = 60  # no section starts with less of the budget left


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="every section at tiny sizes on CPU")
    ap.add_argument("--sections", default=",".join(n for n, _ in SECTIONS))
    ap.add_argument("--out", default="accelerator.jsonl")
    ap.add_argument("--budget_s", type=float, default=470.0,
                    help="wall-clock limit: an isolated section still running then is stopped")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each section in its own process (default: on an accelerator, not with --tiny)")
    ap.add_argument("--section_only", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    _setup_env(a.tiny)
    if a.section_only:
        for r in run_section(a.section_only, a.tiny):
            print(TAG + json.dumps(r), flush=True)
        return 0
    names = [n for n in a.sections.split(",") if n]
    unknown = set(names) - set(dict(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {[n for n, _ in SECTIONS]}")
    isolate = (not a.tiny) if a.isolate is None else a.isolate
    start = time.perf_counter()
    rows = []
    for name in names:
        left = a.budget_s - (time.perf_counter() - start)
        if left < MIN_SECTION_S and not a.tiny:
            got = [{"section": name, "error": f"skipped: {max(left, 0):.0f} s of the {a.budget_s:.0f} s budget left"}]
        elif isolate:
            got = _in_subprocess(name, a.tiny, left)
        else:
            got = run_section(name, a.tiny)
        with open(a.out, "a") as f:
            for r in got:
                f.write(json.dumps(dict(r, tiny=a.tiny)) + "\n")
        rows += got
        print(f"[{time.perf_counter() - start:.0f} s] {name} done", flush=True)
    for name in names:
        print(f"\n### {name}\n\n{table([r for r in rows if r['section'] == name])}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
