"""Sampling loop: N Euler steps of the flow ODE, same weights, same noise, same sigmas.

Ours: the whole loop is one jitted function (lax.fori_loop over `Transformer.apply`). mj.Pipeline
(text encoding + loop + VAE) is its own issue and not on main yet, so this times the denoising loop
alone. Theirs: what the diffusers pipelines do per step, in their native layouts: the transformer in
eager mode, then FlowMatchEulerDiscreteScheduler.step. SD3 runs classifier-free guidance (batch of
[uncond, cond], scale 7); FLUX-dev feeds guidance 3.5 to its embedder (one forward per step).

    python benchmarks/sampling_loop.py --case sd3|flux [--steps 8] [--images 1] [--reps 3]
        [--dtype float32|bfloat16] [--torch_device cpu|cuda] [--compile [--compile_backend eager]]
    # the GPU target: FLUX.1-dev at 1024x1024, 28 steps, bf16, against torch.compile:
    python benchmarks/sampling_loop.py --case flux-dev-1024 --steps 28 --reps 3 --dtype bfloat16 \
        --torch_device cuda --compile

In bfloat16 the two sides round differently at every step, so the final-latents check is loose (5e-2,
a sanity check that both ran the same model); in float32 it is 1e-4.
"""
import argparse
import functools

import numpy as np

import common
import setups


def run(argv=None) -> dict:
    """The comparison for command-line style `argv` (None: sys.argv); returns the result emit() prints."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="sd3", choices=sorted(setups.CASES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both sides' weights and compute dtype")
    ap.add_argument("--torch_device", default="cpu", help="where diffusers runs (cuda on a GPU machine)")
    ap.add_argument("--compile", action="store_true", help="also time the transformer under torch.compile")
    ap.add_argument("--compile_backend", default="inductor",
                    help="torch.compile backend (eager: dynamo's tracing only, for quick checks)")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    import mmdit_jax as mj

    case = setups.CASES[a.case]
    load0 = common.loadavg()
    tdev, tdtype = torch.device(a.torch_device), getattr(torch, a.dtype)
    ref_model = setups.torch_transformer(case, device=tdev, dtype=tdtype).to(tdev, tdtype)
    ours = setups.load_ours(ref_model, functools.partial(mj.load_transformer, dtype=a.dtype))
    tol = 1e-4 if a.dtype == "float32" else 5e-2
    n = a.images
    x = setups.inputs(case)
    noise = x["latents"][:1].repeat(n, 0)
    ctx, pooled = x["context"][:1].repeat(n, 0), x["pooled"][:1].repeat(n, 0)
    cfg_scale, guidance = 7.0, 3.5

    if case.layout == "sd3":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(a.steps)
        # the negative prompt's embeddings: another random context, as encode_prompt would give
        neg_ctx = x["context"][1:2].repeat(n, 0)
        neg_pooled = x["pooled"][1:2].repeat(n, 0)
        ctx_all, pooled_all = np.concatenate([neg_ctx, ctx]), np.concatenate([neg_pooled, pooled])
    else:
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        mu = 0.5 + (1.15 - 0.5) * (case.img_tokens - 256) / (4096 - 256)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / a.steps, a.steps), mu=mu)
        ctx_all, pooled_all = ctx, pooled
    sigmas = np.asarray(sched.sigmas, np.float32)  # N + 1 values ending in 0
    timesteps = sched.timesteps.clone()

    # ---- ours: one jitted loop ----
    def sample(params, latents, context, pooled_, sig):
        def body(i, lat):
            s = jnp.full((lat.shape[0],), sig[i])
            if case.layout == "sd3":
                v_un, v_c = jnp.split(ours.apply(params, jnp.concatenate([lat, lat]), jnp.concatenate([s, s]),
                                                 context, pooled_), 2)
                v = v_un + cfg_scale * (v_c - v_un)
            else:
                v = ours.apply(params, lat, s, context, pooled_, jnp.full_like(s, guidance))
            return lat + (sig[i + 1] - sig[i]) * v
        return jax.lax.fori_loop(0, len(sig) - 1, body, latents)

    run = jax.jit(sample)
    dev = [jnp.asarray(v) for v in (noise, ctx_all, pooled_all, sigmas)]

    def mine():
        return common.block(run(ours.params, *dev))

    # ---- theirs: the pipeline's per-step work, native layouts ----
    t_ctx, t_pooled = (torch.from_numpy(v).to(tdev, tdtype) for v in (ctx_all, pooled_all))
    if case.layout == "flux":
        img_ids, txt_ids = (i.to(tdev) for i in setups.flux_ids(case))
        t_guid = torch.full((n,), guidance, device=tdev)

    def theirs(net=ref_model):
        sched.set_begin_index(0)
        sched._step_index = None
        if case.layout == "sd3":
            lat = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
        else:
            lat = setups.pack(torch.from_numpy(noise)).contiguous()
        lat = lat.to(tdev, tdtype)
        with torch.inference_mode():
            for t in timesteps:
                if case.layout == "sd3":
                    inp = torch.cat([lat, lat])
                    v_un, v_c = net(hidden_states=inp, encoder_hidden_states=t_ctx, pooled_projections=t_pooled,
                                    timestep=t.to(tdev).expand(inp.shape[0]), return_dict=False)[0].chunk(2)
                    v = v_un + cfg_scale * (v_c - v_un)
                else:
                    v = net(hidden_states=lat, encoder_hidden_states=t_ctx, pooled_projections=t_pooled,
                            timestep=t.to(tdev).expand(n) / 1000, guidance=t_guid, img_ids=img_ids,
                            txt_ids=txt_ids, return_dict=False)[0]
                lat = sched.step(v, t, lat, return_dict=False)[0]
        lat = lat.float().cpu()  # also waits for the device
        if case.layout == "sd3":
            return lat.permute(0, 2, 3, 1).numpy()
        return setups.unpack(lat, case.height, case.width).numpy()

    out, compile_s = common.timed(mine)
    holder = []
    ws_theirs = common.working_set_mib(lambda: holder.append(theirs()))  # first call: see forward
    ref = holder.pop()
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(f"{a.case}: {a.steps} steps, final latents max rel err vs diffusers {err:.2e}; first call "
          f"{compile_s:.1f}s", flush=True)
    if err > tol:
        raise SystemExit(f"final latents disagree ({err:.2e} > {tol:g})")
    per_forward = setups.flops(case)["total"] / case.batch * (2 * n if case.layout == "sd3" else n)
    res = {"case": a.case, "what": "sampling", "steps": a.steps, "images": n, "parity_rel_err": err,
           "loadavg_start": load0, "flops": {"total": per_forward * a.steps},
           "ours_first_call_s": compile_s, "settings": common.settings(), "dtype": a.dtype,
           "torch_device": a.torch_device}
    fns = {"ours": mine, "diffusers": theirs}
    if a.compile:
        compiled = functools.partial(theirs, net=torch.compile(ref_model, backend=a.compile_backend))
        cout, res["torch_compile_first_call_s"] = common.timed(compiled)
        res["torch_compile_rel_err"] = float(np.abs(cout - ref).max() / np.abs(ref).max())
        fns["diffusers_compiled"] = compiled
    if a.torch_device == "cpu" and a.dtype == "float32":  # the CPU utilisation denominator
        fns.update(common.matmul_probes())
    res["timing"] = common.interleaved(fns, reps=a.reps, warmup=0, progress=a.case)
    res["memory_mib"] = {"ours": run.lower(ours.params, *dev).compile().memory_analysis().temp_size_in_bytes
                         / 2 ** 20, "diffusers": ws_theirs}
    return res


def main():
    common.emit(run())


if __name__ == "__main__":
    main()
