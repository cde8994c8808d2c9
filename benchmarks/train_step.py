"""Training step (forward + backward + AdamW) on the flow-matching loss, same weights and batch.

Ours: a plain jitted step written here from `Transformer.apply` with optax.adamw (the trainer is its
own issue). Theirs: torch autograd + torch.optim.AdamW (its default implementation for CPU tensors).
Both optimise every parameter with lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01; the two
sides' losses must agree on the first step and on the step after one update.

    python benchmarks/train_step.py --case sd3|flux|flux2 [--reps 5] [--remat none]
"""
import argparse
import functools

import numpy as np

import common
import setups

HYPER = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="sd3", choices=sorted(setups.CASES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--remat", default="none")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    import torch

    import mmdit_jax as mj

    case = setups.CASES[a.case]
    load0 = common.loadavg()
    ref_model = setups.torch_transformer(case)
    ours = setups.load_ours(ref_model, mj.load_transformer)
    x = setups.inputs(case)
    noise = np.random.default_rng(1).standard_normal(x["latents"].shape, dtype=np.float32)
    s = x["sigma"][:, None, None, None]
    x_t, target = (1 - s) * x["latents"] + s * noise, noise - x["latents"]

    # ---- ours ----
    # buffers (SD3's position table) stay fixed, as in torch; adamw's own `mask` only masks weight decay
    labels = jax.tree.map(lambda t: "train" if t else "frozen", ours.trainable_mask())
    tx = optax.multi_transform({"train": optax.adamw(HYPER["lr"], b1=HYPER["b1"], b2=HYPER["b2"],
                                                     eps=HYPER["eps"], weight_decay=HYPER["weight_decay"]),
                                "frozen": optax.set_to_zero()}, labels)

    def loss_fn(params, batch):
        v = ours.apply(params, batch["x_t"], batch["sigma"], batch["context"], batch.get("pooled"),
                       batch.get("guidance"), remat=a.remat)
        return jnp.mean(jnp.square(v - batch["target"]))

    # params and optimizer state donated, as the trainer's step does (torch updates in place too)
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = {k: jnp.asarray(v) for k, v in dict(x_t=x_t, target=target, sigma=x["sigma"], context=x["context"],
                                                  pooled=x.get("pooled"), guidance=x.get("guidance")).items()
             if v is not None}
    state = {"params": ours.params, "opt": tx.init(ours.params)}

    def mine():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], batch)
        return float(common.block(loss))

    # ---- theirs ----
    trainable = [p for p in ref_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=HYPER["lr"], betas=(HYPER["b1"], HYPER["b2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"])
    ref_fn = setups.torch_velocity_fn(case, ref_model)
    t = {k: torch.from_numpy(v) for k, v in dict(x_t=x_t, target=target, sigma=x["sigma"], context=x["context"],
                                                  pooled=x.get("pooled"), guidance=x.get("guidance")).items()
         if v is not None}
    ref_model.train()

    def theirs():
        opt.zero_grad(set_to_none=True)
        v = ref_fn(t["x_t"], t["sigma"], t["context"], t.get("pooled"), t.get("guidance"))
        loss = torch.mean(torch.square(v - t["target"]))
        loss.backward()
        opt.step()
        return loss.item()

    first, compile_s = common.timed(mine)
    holder = []
    ws_theirs = common.working_set_mib(lambda: holder.append(theirs()))  # first call: see forward
    losses = [(first, holder.pop()), (mine(), theirs())]  # step 2 sees one AdamW update on each side
    errs = [abs(o - r) / abs(r) for o, r in losses]
    print(f"{a.case}: losses ours/theirs {losses}; rel err {max(errs):.2e}; first step {compile_s:.1f}s",
          flush=True)
    if max(errs) > 1e-4:
        raise SystemExit("losses disagree: the two sides are not training the same thing")
    fns = {"ours": mine, "diffusers": theirs}
    res = {"case": a.case, "what": "train", "parity_rel_err": max(errs), "remat": a.remat,
           "loadavg_start": load0, "flops": {k: 3 * v for k, v in setups.flops(case).items()},
           "ours_first_call_s": compile_s, "settings": common.settings()}
    res["timing"] = common.interleaved({**fns, **common.matmul_probes()}, reps=a.reps, warmup=1, progress=a.case)
    res["memory_mib"] = {"ours": step.lower(state["params"], state["opt"], batch).compile().memory_analysis()
                         .temp_size_in_bytes / 2 ** 20, "diffusers": ws_theirs}
    common.emit(res)


if __name__ == "__main__":
    main()
