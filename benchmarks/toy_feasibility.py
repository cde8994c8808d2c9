"""Toy feasibility study: can a small MMDiT learn the toy world on 2 CPU cores in ~7 minutes?

A self-contained plain JAX loop (the real trainer lives in mmdit_jax.cli.train): rectified flow
x_t = (1 - s) x0 + s eps, target eps - x0, logit-normal s, AdamW (optax), on `Transformer.apply` with
the toy pipeline's frozen text encoders (caption embeddings computed once: there are only a few
hundred captions), pixel-space latents and the procedural dataset. Caption dropout trains the
unconditional branch (the empty prompt) for classifier-free guidance. Evaluation: Euler sampling of the
held-out prompts with CFG, scored by the toy checker.

    PYTHONPATH=. python benchmarks/toy_feasibility.py --minutes=7 --out=/tmp/toy_feas
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mmdit_jax as mj  # noqa: E402
from mmdit_jax.toy import dataset  # noqa: E402
from mmdit_jax.toy.components import toy_config, write_toy_pipeline  # noqa: E402
from mmdit_jax.toy.evaluate import evaluate, plot_loss_curve  # noqa: E402


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="sd3")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--single_layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--max_steps", type=int, default=100000)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout probability")
    p.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--shift", type=float, default=1.0, help="sampling schedule shift")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--vae_factor", type=int, default=2)
    p.add_argument("--text_length", type=int, default=16, help="CLIP and T5 token counts")
    p.add_argument("--eval_every", type=int, default=0, help="steps between evaluations (0: end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/toy_feasibility")
    return p.parse_args()


def main():
    a = parse()
    os.makedirs(a.out, exist_ok=True)
    cfg = toy_config(a.variant, layers=a.layers, single_layers=a.single_layers, heads=a.heads,
                     head_dim=a.head_dim, resolution=a.resolution, vae_factor=a.vae_factor,
                     clip_length=a.text_length, max_sequence_length=a.text_length)
    folder = os.path.join(a.out, "pipeline")
    write_toy_pipeline(folder, config=cfg, seed=a.seed, overwrite=True)
    model = mj.load_transformer(folder)
    vae = mj.load_vae(folder)
    enc = mj.load_text_encoders(folder)
    print(f"transformer {model.config}\nparameters {mj.count_params(model.config) / 1e6:.2f} M", flush=True)

    # every caption the data can produce, plus "" (the unconditional prompt), embedded once
    captions = dataset.all_captions() + [""]
    index = {c: i for i, c in enumerate(captions)}
    ctx_all, pooled_all = enc(captions, max_sequence_length=cfg.max_sequence_length)
    ctx_all, pooled_all = np.asarray(ctx_all), np.asarray(pooled_all)
    empty = index[""]

    ds = dataset.ToyShapes(a.resolution, seed=a.seed)
    rng = np.random.default_rng(a.seed)
    flux_guidance = None

    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, max(a.max_steps, a.warmup + 1), a.lr * 0.1) \
        if a.max_steps < 100000 else optax.join_schedules(
            [optax.linear_schedule(0.0, a.lr, a.warmup), optax.constant_schedule(a.lr)], [a.warmup])
    opt = optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=a.weight_decay)
    params = model.params
    mask = model.trainable_mask()
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    opt_state = opt.init(trainable)

    def merge(tr, fr):
        return jax.tree.map(lambda t, f: t if f is None else f, tr, fr, is_leaf=lambda x: x is None)

    def loss_fn(tr, x0, eps, s, ctx, pooled):
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
        v = model.apply(merge(tr, frozen), xt, s, ctx, pooled, flux_guidance)
        return jnp.mean(jnp.square(v - (eps - x0)))

    @jax.jit
    def train_step(tr, opt_state, images, ctx, pooled, key):
        x0 = vae.encode_apply(vae.params, images.astype(jnp.float32) / 127.5 - 1.0)
        k1, k2 = jax.random.split(key)
        eps = jax.random.normal(k1, x0.shape)
        s = jax.nn.sigmoid(jax.random.normal(k2, (x0.shape[0],)))  # logit-normal(0, 1)
        loss, grads = jax.value_and_grad(loss_fn)(tr, x0, eps, s, ctx, pooled)
        updates, opt_state = opt.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    def sigmas(n, shift):
        t = np.linspace(1.0, 0.0, n + 1)
        return shift * t / (1 + (shift - 1) * t)

    @jax.jit
    def sample(tr, noise, ctx, pooled, ctx_u, pooled_u, w, sig):
        p = merge(tr, frozen)

        def body(x, i):
            s, s_next = sig[i], sig[i + 1]
            sv = jnp.full((x.shape[0],), s)
            both = model.apply(p, jnp.concatenate([x, x]), jnp.concatenate([sv, sv]),
                               jnp.concatenate([ctx, ctx_u]), jnp.concatenate([pooled, pooled_u]))
            vc, vu = jnp.split(both, 2)
            return x + (s_next - s) * (vu + w * (vc - vu)), None

        x, _ = jax.lax.scan(body, noise, jnp.arange(sig.shape[0] - 1))
        return vae.decode_apply(vae.params, x)

    def sample_fn_for(tr, w):
        def fn(prompts, seed):
            ids = np.array([index[p] for p in prompts])
            lat = a.resolution // a.vae_factor
            noise = jax.random.normal(jax.random.key(seed), (len(prompts), lat, lat,
                                                             vae.config.latent_channels))
            x = sample(tr, noise, ctx_all[ids], pooled_all[ids], ctx_all[[empty] * len(ids)],
                       pooled_all[[empty] * len(ids)], jnp.float32(w), jnp.asarray(sigmas(a.steps, a.shift)))
            return np.asarray(jnp.clip((x + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
        return fn

    specs = dataset.held_out_specs()
    # as many training-combination prompts as held-out ones (one compiled sampler for both)
    train_specs = [dataset.Spec(*t, z) for t, z in zip(dataset.TRAIN_TRIPLES[::4], list(dataset.SIZES) * 99)]

    def run_eval(tag, tr, ws=None, with_train=True):
        out = {}
        for w in ws or a.cfg:
            t0 = time.time()
            res = evaluate(sample_fn_for(tr, w), specs, os.path.join(a.out, f"{tag}_cfg{w:g}"), seeds=(0, 1),
                           verbose=False)
            out[w] = {"held_out": res}
            msg = f"  eval {tag} cfg {w:g}: held-out " + " ".join(f"{k} {v:.3f}" for k, v in res.items())
            if with_train:
                res_tr = evaluate(sample_fn_for(tr, w), train_specs, None, seeds=(0,), verbose=False)
                out[w]["train"] = res_tr
                msg += (f" | train-combos overall {res_tr['overall']:.3f} colour {res_tr['colour']:.3f} "
                        f"position {res_tr['position']:.3f}")
            print(msg + f" ({time.time() - t0:.1f}s)", flush=True)
        return out

    key = jax.random.key(a.seed)
    losses, steps_log = [], []
    t_start = time.time()
    t_compile = None
    step = 0
    cpu_time = 0.0  # process CPU seconds spent in steps: what an idle machine would need
    budget = a.minutes * 60
    evals = {}
    train_time = 0.0
    while step < a.max_steps:
        t0, c0 = time.time(), time.process_time()
        idx = np.arange(step * a.batch, (step + 1) * a.batch)
        items = [ds[i] for i in idx]
        images = np.stack([it["image"] for it in items])
        cap = np.array([index[it["caption"]] for it in items])
        cap = np.where(rng.random(a.batch) < a.drop, empty, cap)
        key, sub = jax.random.split(key)
        trainable, opt_state, loss = train_step(trainable, opt_state, images, ctx_all[cap], pooled_all[cap], sub)
        loss.block_until_ready()  # time whole steps, not dispatches
        if step == 0:
            t_compile = time.time() - t0
            print(f"compile + first step {t_compile:.1f}s", flush=True)
        else:
            train_time += time.time() - t0
            cpu_time += time.process_time() - c0
        step += 1
        if step % 25 == 0 or step == 1:
            lv = float(loss)
            losses.append(lv)
            steps_log.append(step)
            el = time.time() - t_start
            rate = (step - 1) / max(train_time, 1e-9)
            cps = cpu_time / max(step - 1, 1)
            print(f"step {step} loss {lv:.4f} | {rate:.2f} steps/s | {cps:.2f} cpu-s/step | "
                  f"{el / 60:.1f} min", flush=True)
        if a.eval_every and step % a.eval_every == 0 and step < a.max_steps:
            evals[step] = run_eval(f"step{step}", trainable, ws=a.cfg[-1:], with_train=False)
        if train_time + (t_compile or 0) >= budget:
            break
    total = time.time() - t_start
    print(f"trained {step} steps in {train_time:.0f}s of steps (+{t_compile:.0f}s compile), "
          f"{(step - 1) / train_time:.2f} steps/s, {(step - 1) * a.batch / train_time:.0f} images/s; "
          f"{cpu_time / (step - 1):.2f} CPU-seconds per step (2 idle cores: ~{2 * (step - 1) / cpu_time:.2f} "
          "steps/s)", flush=True)
    plot_loss_curve(steps_log, losses, os.path.join(a.out, "loss.png"))
    t0 = time.time()
    evals[step] = run_eval("final", trainable)
    print(f"final eval {time.time() - t0:.0f}s; total {time.time() - t_start:.0f}s", flush=True)
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump({"args": vars(a), "steps": step, "train_seconds": train_time, "compile_seconds": t_compile,
                   "cpu_seconds_per_step": cpu_time / (step - 1),
                   "steps_per_s": (step - 1) / train_time, "wall_seconds": total,
                   "evals": {str(k): {str(w): r for w, r in v.items()} for k, v in evals.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
