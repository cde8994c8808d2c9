"""Transformer forward: mj.Transformer (jitted) versus diffusers eager (and torch.compile), same weights.

    python benchmarks/transformer_forward.py --case sd3|flux|flux2 [--reps 7] [--no-compile]
"""
import argparse

import numpy as np

import common
import setups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="sd3", choices=sorted(setups.CASES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    a = ap.parse_args()

    import jax
    import torch

    import mmdit_jax as mj

    case = setups.CASES[a.case]
    load0 = common.loadavg()
    ref_model = setups.torch_transformer(case)
    ours = setups.load_ours(ref_model, mj.load_transformer)
    x = setups.inputs(case)
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    ref_fn = setups.torch_velocity_fn(case, ref_model)
    args = (x["latents"], x["sigma"], x["context"], x.get("pooled"), x.get("guidance"))
    targs = (tx["latents"], tx["sigma"], tx["context"], tx.get("pooled"), tx.get("guidance"))
    dev = [jax.device_put(v) if v is not None else None for v in args]

    def theirs():
        with torch.inference_mode():
            return ref_fn(*targs)

    def mine():
        return common.block(ours(*dev))

    holder = []
    out, compile_s = common.timed(mine)  # first call = trace + XLA compile + one run
    # RSS growth of diffusers' first call (later calls reuse the allocator's freed pages)
    ws_theirs = common.working_set_mib(lambda: holder.append(theirs()))
    ref = holder.pop().numpy()
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(f"{a.case}: max rel err vs diffusers {err:.2e}; first jitted call {compile_s:.1f}s", flush=True)
    if err > 1e-4:
        raise SystemExit(f"outputs disagree ({err:.2e}): not timing different computations")

    fns = {"ours": mine, "diffusers": theirs}
    res = {"case": a.case, "what": "forward", "parity_rel_err": err, "loadavg_start": load0,
           "flops": setups.flops(case), "ours_first_call_s": compile_s, "settings": common.settings()}
    if not a.no_compile:
        try:
            compiled = torch.compile(ref_fn)

            def theirs_compiled():
                with torch.inference_mode():
                    return compiled(*targs)

            cout, res["torch_compile_first_call_s"] = common.timed(theirs_compiled)
            res["torch_compile_rel_err"] = float(np.abs(cout.numpy() - ref).max() / np.abs(ref).max())
            fns["diffusers_compiled"] = theirs_compiled
        except Exception as e:  # an inductor/toolchain failure is a result to report, not a crash
            res["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print("torch.compile failed:", res["torch_compile_error"], flush=True)
    res["timing"] = common.interleaved({**fns, **common.matmul_probes()}, reps=a.reps, warmup=1, progress=a.case)
    res["memory_mib"] = {"ours": ours._jitted.lower(ours.params, *dev).compile().memory_analysis()
                         .temp_size_in_bytes / 2 ** 20, "diffusers": ws_theirs}
    common.emit(res)


if __name__ == "__main__":
    main()
