"""The pure training step: (state, batch) -> (state, metrics). jit it with shardings and donate the state.

Master weights, optimizer state and EMA are float32; the forward/backward runs on a copy of the weights
cast to the compute dtype (the cast is inside the differentiated function, so gradients arrive in float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmdit_jax.training import objective
from mmdit_jax.training.optim import ema_update
from mmdit_jax.training.state import TrainState


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(model, tx: optax.GradientTransformation, cfg, layout=(), null_text=None):
    """`model`: a Transformer (its `apply` and config are used; its params are not). `layout`,
    `null_text`: the data's text_layout and (context, pooled) of the empty caption."""
    compute = jnp.dtype(cfg.model.compute_dtype)
    remat = cfg.model.remat
    has_guidance = bool(getattr(model.config, "guidance_embed", False))
    accum = cfg.optim.grad_accum
    lc = cfg.loss

    def apply_fn(params, x_t, sigma, context, pooled, guidance):
        return model.apply(cast_floats(params, compute), x_t.astype(compute), sigma, context.astype(compute),
                           pooled.astype(compute), guidance, remat=remat)

    def micro_loss(params, mb):
        guidance = jnp.full(mb["sigma"].shape, lc.guidance, jnp.float32) if has_guidance else None
        return objective.flow_loss(apply_fn, params, mb["latents"], mb["eps"], mb["sigma"], mb["context"],
                                   mb["pooled"], guidance, lc.weighting)

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
        return dict(latents=x0, eps=eps, sigma=sigma, context=ctx, pooled=pooled)

    def grads_of(params, full):
        if accum == 1:
            return jax.value_and_grad(micro_loss)(params, full)
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), full)

        def body(carry, mb):
            loss, g = jax.value_and_grad(micro_loss)(params, mb)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], g)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, g), _ = jax.lax.scan(body, zero, micro)
        return loss / accum, jax.tree.map(lambda x: x / accum, g)

    def train_step(state: TrainState, batch):
        rng, key = jax.random.split(state.rng)
        full = prepare(key, batch)
        loss, grads = grads_of(state.params, full)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, state.step, cfg.ema) if state.ema is not None else None
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=rng), metrics

    return train_step


def batch_sharding(mesh):
    from jax.sharding import NamedSharding

    from mmdit_jax.sharding import logical_to_spec

    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def jit_train_step(model, tx, cfg, mesh, state_sh, layout=(), null_text=None):
    """The step jitted for `mesh`: state in/out in its shardings (donated), batch split over the
    data-parallel axes, metrics replicated."""
    from mmdit_jax.training.state import replicated

    step = make_train_step(model, tx, cfg, layout, null_text)

    def on_mesh(state, batch):
        # the ambient mesh lets the blocks constrain tokens to "sequence" and attention go context
        # parallel (mmdit_jax.attention); without a sequence axis it changes nothing
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, batch)

    return jax.jit(on_mesh,
                   in_shardings=(state_sh, batch_sharding(mesh)), out_shardings=(state_sh, replicated(mesh)),
                   donate_argnums=0)


def make_eval_loss(model, cfg):
    """(params, batch, sigma, eps) -> unweighted flow loss at fixed (sigma, eps): the validation loss."""
    compute = jnp.dtype(cfg.model.compute_dtype)
    has_guidance = bool(getattr(model.config, "guidance_embed", False))

    def apply_fn(params, x_t, sigma, context, pooled, guidance):
        return model.apply(cast_floats(params, compute), x_t.astype(compute), sigma, context.astype(compute),
                           pooled.astype(compute), guidance)

    def eval_loss(params, batch, sigma, eps):
        guidance = jnp.full(sigma.shape, cfg.loss.guidance, jnp.float32) if has_guidance else None
        return objective.flow_loss(apply_fn, params, batch["latents"].astype(jnp.float32), eps, sigma,
                                   batch["context"], batch["pooled"], guidance, "none")

    return eval_loss
