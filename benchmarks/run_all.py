"""The one command that reproduces the comparison table in benchmarks/RESULTS.md.

Runs every comparison in its own process (this project and diffusers side by side in that process,
calls interleaved), then writes the table, with the machine, versions, load and this command, between
the run_all markers of RESULTS.md (other sections are kept). Utilisation is achieved FLOP/s (analytic
count) over the higher of the two frameworks' measured dense-matmul rates.

    python benchmarks/run_all.py [--only forward,train,sampling,vae,text,compile] [--quick] [--dry]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402

BEGIN, END = "<!-- run_all.py: begin -->", "<!-- run_all.py: end -->"


def comparisons(quick: bool) -> list[tuple[str, list[str]]]:
    r = (lambda full, fast: str(fast if quick else full))
    todo = [("peak", ["matmul_peak.py", "--reps", r(9, 3)])]
    # (cases, repetitions of forward / train / sampling): the small configurations (width 512 over 512
    # tokens), then mid (width 256 over 256) and tiny (width 128 over 96: the overhead-bound regime), so
    # the table shows how the ratios move with size; the smaller ones are cheap enough for more repetitions
    for cases, (fwd, train, sampling) in ((("sd3", "flux"), (7, 5, 2)), (("sd3-mid", "flux-mid"), (9, 7, 3)),
                                          (("sd3-tiny", "flux-tiny"), (15, 15, 5))):
        todo += [("forward", ["transformer_forward.py", "--case", c, "--reps", r(fwd, 3)]) for c in cases]
        todo += [("train", ["train_step.py", "--case", c, "--reps", r(train, 2)]) for c in cases]
        todo += [("sampling", ["sampling_loop.py", "--case", c, "--steps", r(8, 3), "--reps", r(sampling, 1)])
                 for c in cases]
    # FLUX.2 (dev style) forward and training step at the FLUX.1 cases' widths and token counts
    for case, (fwd, train) in (("flux2", (7, 5)), ("flux2-mid", (9, 7)), ("flux2-tiny", (15, 15))):
        todo += [("forward", ["transformer_forward.py", "--case", case, "--reps", r(fwd, 3)]),
                 ("train", ["train_step.py", "--case", case, "--reps", r(train, 2)])]
    return todo + [
        ("vae", ["vae_decode.py", "--reps", r(5, 2)]),
        ("text", ["text_encode.py", "--reps", r(7, 3)]),
        ("compile", ["compile_time.py", "--preset", "sd3-medium", "--depths", "2,24", "--repeats", "1"]),
        ("compile", ["compile_time.py", "--preset", "flux-dev", "--depths", "1,19", "--repeats", "1"]),
    ]


def run_one(argv: list[str]) -> dict:
    """Runs one comparison script in a fresh process, echoing its progress; returns its result."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(HERE, argv[0]), *argv[1:]]
    print(f"$ {shlex.join(['python', 'benchmarks/' + argv[0], *argv[1:]])}   (load {common.loadavg()})",
          flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result, tail = None, []
    for line in proc.stdout:
        if line.startswith(common.RESULT_TAG):
            result = json.loads(line[len(common.RESULT_TAG):])
        elif "Warning" not in line and line.strip():
            tail = (tail + [line.rstrip()])[-20:]
            print("   ", line.rstrip(), flush=True)
    proc.wait()
    if proc.returncode or result is None:
        return {"what": argv[0], "error": f"exit {proc.returncode}: " + " | ".join(tail[-3:])}
    result["wall_s"] = time.perf_counter() - t
    return result


def _ms(s):
    return f"{s * 1e3:,.0f} ms" if s >= 0.1 else f"{s * 1e3:.1f} ms"


def _mib(v):
    return "n/a" if v is None else f"{v:,.0f}"


def _eager_utilisation(r: dict) -> float | None:
    """diffusers' achieved FLOP/s over the matmul rate timed alongside; its inverse is the speed-up
    bound: what running every FLOP at that rate would give over eager."""
    flops, alongside = r.get("flops", {}).get("total"), common.probe_peak(r["timing"])
    return flops / r["timing"]["diffusers"]["median_s"] / alongside if flops and alongside else None


def table(results: list[dict]) -> list[str]:
    rows = ["| comparison | config | ours | diffusers eager | speed-up | torch.compile | speed-up | "
            "ours GFLOP/s | utilisation (of GFLOP/s) | eager's utilisation | speed-up bound | max rel err | "
            "memory MiB ours / eager | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("what") in ("matmul_peak", "compile_time"):
            continue
        if "error" in r:
            rows.append(f"| {r['what']} | FAILED: {r['error'][:200]} |" + " |" * 12)
            continue
        t = r["timing"]
        ours, eager = t["ours"]["median_s"], t["diffusers"]["median_s"]
        comp = t.get("diffusers_compiled", {}).get("median_s")
        comp_txt = _ms(comp) if comp else ("failed" if "torch_compile_error" in r else "not run")
        flops = r.get("flops", {}).get("total")
        rate = flops / ours if flops else None
        alongside = common.probe_peak(t)
        # only against matmuls timed alongside: a peak taken at another moment's load can exceed 100%
        util = f"{100 * rate / alongside:.0f}% (of {alongside / 1e9:.0f})" if rate and alongside else ""
        eager_util = _eager_utilisation(r)
        their_util = f"{100 * eager_util:.0f}%" if eager_util else ""
        bound = f"{1 / eager_util:.2f}x" if eager_util else ""
        ws = r.get("memory_mib", {})
        what = {"forward": "transformer forward", "train": "train step (fwd+bwd+AdamW)",
                "sampling": f"sampling loop, {r.get('steps')} steps", "vae_decode": "VAE decode",
                "text_encode": "prompt encoding"}.get(r["what"], r["what"])
        case = r["case"] + (f", remat {r['remat']}" if "remat" in r else "")
        rows.append(f"| {what} | {case} | {_ms(ours)} | {_ms(eager)} | **{eager / ours:.2f}x** | {comp_txt} | "
                    f"{f'{comp / ours:.2f}x' if comp else ''} | {f'{rate / 1e9:.1f}' if rate else ''} | {util} | "
                    f"{their_util} | {bound} | "
                    f"{r['parity_rel_err']:.1e} | {_mib(ws.get('ours'))} / {_mib(ws.get('diffusers'))} | "
                    f"{r['loadavg_start'].split()[0]} |")
    return rows


# the CPU targets: (comparison, minimum speed-up over diffusers eager, minimum utilisation)
TARGETS = {"forward": (1.5, 0.65), "train": (1.2, None), "sampling": (1.5, None)}


def target_status(results: list[dict]) -> list[str]:
    """One line per comparison with a target: met or not, and the bound the matmul rate puts on it.

    The bound is the speed-up we would get running at 100% of the matmul rate timed alongside, i.e.
    (matmul rate) / (diffusers' achieved FLOP/s): no implementation of the same FLOPs can beat it."""
    lines = []
    for r in results:
        if r.get("what") not in TARGETS or "error" in r:
            continue
        need, need_util = TARGETS[r["what"]]
        t = r["timing"]
        ours, eager = t["ours"]["median_s"], t["diffusers"]["median_s"]
        eager_util = _eager_utilisation(r)
        ok = eager / ours >= need
        text = (f"- {r['what']} {r['case']}: {eager / ours:.2f}x diffusers eager (target {need}x: "
                f"{'met' if ok else 'not met'})")
        if eager_util:
            text += (f"; diffusers runs at {100 * eager_util:.0f}% of the matmul rate, so no "
                     f"implementation can be more than {1 / eager_util:.2f}x faster here")
            if need_util:
                util = eager_util * eager / ours
                text += (f"; our utilisation {100 * util:.0f}% (target {100 * need_util:.0f}%: "
                         f"{'met' if util >= need_util else 'not met'})")
        lines.append(text + ".")
    return (["Against the issue's CPU targets (generated from this run):", ""] + lines + [""]) if lines else []


def render(results: list[dict], command: str, started: str) -> str:
    peak_r = next((r for r in results if r.get("what") == "matmul_peak" and "error" not in r), None)
    peak = peak_r["peak_flops"] if peak_r else None
    s = next((r["settings"] for r in results if "settings" in r), {})
    out = [BEGIN, "## diffusers versus mmdit-jax, same machine, same weights (issue 10)", "",
           f"Command: `{command}` (started {started}, {len(results)} processes).", "",
           f"Machine: {s.get('cpu')}, {s.get('cores')} cores; python {s.get('python')}, jax {s.get('jax')} "
           f"(backend {s.get('jax_backend')}, XLA_FLAGS `{s.get('xla_flags') or '(unset)'}`), flax {s.get('flax')}, "
           f"torch {s.get('torch')} ({s.get('torch_threads')} intra-op threads), diffusers {s.get('diffusers')}. "
           "float32 everywhere.", ""]
    if peak_r:
        out += [f"Dense float32 matmul peak (square, best of sizes {peak_r['case']}): torch "
                f"{peak_r['torch_flops'] / 1e9:.1f} GFLOP/s, XLA {peak_r['jax_flops'] / 1e9:.1f} GFLOP/s; "
                f"higher: {peak / 1e9:.1f} GFLOP/s. Utilisation in the table is achieved FLOP/s over the higher of "
                f"the two frameworks' {common.PROBE_N}x{common.PROBE_N} matmul rates timed in the same process, "
                "interleaved with the calls it rates (shown in brackets), so both see the same load. Speed-up "
                "bound = that matmul rate / diffusers' achieved FLOP/s: the speed-up over eager that running "
                "every FLOP at the matmul rate would give.", ""]
    out += table(results)
    out += ["", "Times are medians of interleaved repetitions (ours, eager, compiled, ours, ...) after a warm-up "
            "call; the first call (tracing and compiling) is excluded and reported below. Speed-up = their "
            "time / ours. Memory: ours = XLA's planned temporaries of the compiled call (exact; parameters and inputs "
            "excluded); eager = growth of the process's peak RSS during diffusers' first call (later calls reuse "
            "freed pages, so this is the closest CPU measure torch offers; a lower bound). FLOPs are analytic: "
            "per block 24*D^2*S + 4*D*S^2 forward over the joint sequence S (FLUX single blocks: linear1 "
            "d->7d plus linear2 5d->d give the same 24*D^2*S), plus embedders, adaLN and final layer; "
            "training counts 3x forward; sampling counts every transformer forward (SD3 with CFG: 2 per "
            "step). Load is /proc/loadavg at the start of each comparison (other jobs share this machine).", ""]
    out += target_status(results)
    firsts = [r for r in results if "ours_first_call_s" in r]
    if firsts:
        out += ["First call (trace + compile + run), seconds: " + "; ".join(
            f"{r['what']} {r['case']}: ours {r['ours_first_call_s']:.1f}"
            + (f", torch.compile {r['torch_compile_first_call_s']:.1f}" if "torch_compile_first_call_s" in r else "")
            for r in firsts) + ".", ""]
    for r in results:
        if r.get("what") == "compile_time" and "rows" in r:
            out += [f"Compile time versus depth, {r['case']} layout ({r['heads']} heads; abstract parameters, "
                    f"min of {r.get('repeats', 3)}): " + "; ".join(f"depth {x['depth']} ({x['stacks']} scanned stacks): forward "
                                               f"{x['forward_s']:.1f} s, grad {x['grad_s']:.1f} s" for x in r["rows"])
                    + ".", ""]
    errors = [r for r in results if "torch_compile_error" in r]
    for r in errors:
        out += [f"torch.compile failed for {r['what']} {r['case']}: {r['torch_compile_error']}", ""]
    out.append(END)
    return "\n".join(out) + "\n"


def write_results(section: str, path: str) -> None:
    """Replaces the marked section of RESULTS.md (or puts it after the title); written aside, then renamed."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        head, _, rest = text.partition("\n")
        text = head + "\n\n" + section + ("\n" + rest.lstrip("\n") if rest.strip() else "")
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated subset: peak,forward,train,sampling,vae,text,compile")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and steps (a smoke run)")
    ap.add_argument("--dry", action="store_true", help="print the table instead of writing RESULTS.md")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    a = ap.parse_args()
    command = "python benchmarks/run_all.py" + "".join(f" {x}" for x in sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    todo = [c for c in comparisons(a.quick) if not a.only or c[0] in a.only.split(",")]
    results, t0 = [], time.perf_counter()
    for i, (_, argv) in enumerate(todo):
        results.append(run_one(argv))
        done = time.perf_counter() - t0
        print(f"[{i + 1}/{len(todo)}] {done:.0f}s elapsed, ETA {done / (i + 1) * (len(todo) - i - 1):.0f}s",
              flush=True)
    section = render(results, command, started)
    print(section)
    if not a.dry:
        write_results(section, a.out)
        print(f"wrote {a.out}")
    if any("error" in r for r in results):
        raise SystemExit("some comparisons failed (see the table)")


if __name__ == "__main__":
    main()
