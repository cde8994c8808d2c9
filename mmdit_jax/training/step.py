"""The pure training step: (state, batch, frozen) -> (state, metrics). jit it with shardings and donate the
state. `frozen` is the mode's untrained tree (LoRA base, distillation teacher; None when training in full).

Master weights, optimizer state and EMA are float32; the forward/backward runs on a copy of the weights
cast to the compute dtype (the cast is inside the differentiated function, so gradients arrive in float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmdit_jax.sharding import under_mesh
from mmdit_jax.training import objective
from mmdit_jax.training.modes import FullMode
from mmdit_jax.training.optim import ema_update
from mmdit_jax.training.state import TrainState

MODE_KEY = 0x10A  # the mode's randomness (LoRA dropout, distillation guidance) folds this into the step key


def make_train_step(model, tx: optax.GradientTransformation, cfg, layout=(), null_text=None, mode=None):
    """`model`: a Transformer (its `apply` and config are used; its params are not). `layout`,
    `null_text`: the data's text_layout and (context, pooled) of the empty caption. `mode`: a
    training.modes.TrainMode (default: full training of `model`)."""
    compute = jnp.dtype(cfg.model.compute_dtype)
    remat = cfg.model.remat
    mode = mode or FullMode(cfg, model.config)
    accum = cfg.optim.grad_accum
    lc = cfg.loss
    trainable = jax.tree.leaves(mode.trainable_mask(model))

    def trainable_norm(grads):
        """The global norm clipping sees: buffers (SD3's position table) have gradients but no updates."""
        return optax.global_norm([g for g, t in zip(jax.tree.leaves(grads), trainable, strict=True) if t])

    def apply_fn(frozen, key):
        def fn(params, x_t, sigma, context, pooled, guidance):
            return mode.velocity(model, params, frozen, x_t, sigma, context, pooled, guidance, compute=compute,
                                 remat=remat, rng=key)
        return fn

    def micro_loss(params, frozen, mb, key):
        return mode.loss(model, apply_fn(frozen, key), params, frozen, mb, null_text, lc.weighting, compute=compute)

    def prepare(key, batch):
        """Text dropout and (sigma, eps) for the whole batch, before it is split into microbatches, so
        accumulation changes the arithmetic only, never the draws."""
        k_text, k_noise = jax.random.split(key)
        x0 = batch["latents"].astype(jnp.float32)
        ctx, pooled = batch["context"], batch["pooled"]
        if null_text is not None or lc.encoder_dropout > 0:
            null_ctx, null_pooled = null_text if null_text is not None else (None, None)
            ctx, pooled = objective.drop_text(k_text, ctx, pooled, layout, null_ctx, null_pooled,
                                              lc.encoder_dropout,
                                              lc.caption_dropout if null_text is not None else 0.0)
        sigma, eps = objective.draw_noise(k_noise, x0, cfg.timesteps)
        out = dict(latents=x0, eps=eps, sigma=sigma, context=ctx, pooled=pooled)
        guidance = mode.draw_guidance(jax.random.fold_in(key, MODE_KEY), sigma)
        if guidance is not None:
            out["guidance"] = guidance
        return out

    def grads_of(params, frozen, full, key):
        if accum == 1:
            return jax.value_and_grad(micro_loss)(params, frozen, full, key)
        # microbatch i holds rows i, i + accum, i + 2 accum, ...: a device's rows are contiguous in the
        # batch, so every microbatch keeps an equal share on every data-parallel device (no gathering,
        # and each device computes only its own rows); the mean over all rows is the same either way.
        # Sliced inside the loop, so the batch is never copied into microbatch order.
        def body(carry, i):
            mb = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
                x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), i, axis=1, keepdims=False), full)
            loss, g = jax.value_and_grad(micro_loss)(params, frozen, mb, jax.random.fold_in(key, i))
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], g)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, g), _ = jax.lax.scan(body, zero, jnp.arange(accum))
        return loss / accum, jax.tree.map(lambda x: x / accum, g)

    def train_step(state: TrainState, batch, frozen=None):
        rng, key = jax.random.split(state.rng)
        full = prepare(key, batch)
        # dropout keys for LoRA; folded in, so full mode's draws are what they always were
        loss, grads = grads_of(state.params, frozen, full, jax.random.fold_in(key, MODE_KEY + 1))
        grad_norm = trainable_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, state.step, cfg.ema) if state.ema is not None else None
        # a non-finite loss or gradient never reaches the weights: params, optimizer state (so its update
        # count and schedule) and EMA stay as they were; the step still counts, since its batch and keys are
        # spent, which keeps checkpoints and resumes in step with the data stream
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = (lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old))
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = keep(ema, state.ema) if ema is not None else None
        metrics = dict(loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=rng), metrics

    return train_step


def batch_sharding(mesh):
    from jax.sharding import NamedSharding

    from mmdit_jax.sharding import logical_to_spec

    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def jit_train_step(model, tx, cfg, mesh, state_sh, layout=(), null_text=None, mode=None, frozen_sh=None):
    """The step jitted for `mesh`: state in/out in its shardings (donated), batch split over the
    data-parallel axes, the frozen tree (if the mode has one) in `frozen_sh`, metrics replicated. Called
    as step(state, batch), or step(state, batch, frozen) when the mode has a frozen tree."""
    from mmdit_jax.training.state import replicated

    on_mesh = under_mesh(make_train_step(model, tx, cfg, layout, null_text, mode), mesh)

    if frozen_sh is None:  # full mode: nothing frozen, step(state, batch)
        return jax.jit(on_mesh, in_shardings=(state_sh, batch_sharding(mesh)),
                       out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
    return jax.jit(on_mesh, in_shardings=(state_sh, batch_sharding(mesh), frozen_sh),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)


def make_eval_loss(model, cfg, mode=None, frozen=None, mesh=None):
    """(params, batch, sigma, eps) -> unweighted loss at fixed (sigma, eps): the validation loss (the
    flow loss; for distillation the distillation loss at guidance spread over [min, max]). Jitted (under
    `mesh`, the one the params live on, as the ambient mesh); the frozen tree is an argument of the
    jitted function, never a constant baked into it."""
    compute = jnp.dtype(cfg.model.compute_dtype)
    mode = mode or FullMode(cfg, model.config)

    def apply_fn(frozen):
        def fn(params, x_t, sigma, context, pooled, guidance):
            return mode.velocity(model, params, frozen, x_t, sigma, context, pooled, guidance, compute=compute)
        return fn

    def eval_loss(params, frozen, batch, sigma, eps, null):
        full = dict(latents=batch["latents"].astype(jnp.float32), eps=eps, sigma=sigma, context=batch["context"],
                    pooled=batch["pooled"], guidance=mode.eval_guidance(sigma))
        return mode.loss(model, apply_fn(frozen), params, frozen, full, null, "none", compute=compute)


    jitted = jax.jit(under_mesh(eval_loss, mesh))

    def run(params, batch, sigma, eps, null=None):
        return jitted(params, frozen, batch, sigma, eps, null)

    return run
