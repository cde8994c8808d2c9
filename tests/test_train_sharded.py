"""FLUX-dev training feeds the configured guidance value, and bf16 compute keeps float32 master weights.
(Sharded steps on meshes of 8 devices against the single-device step: tests/test_train_mesh.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_jax as mj
import train_fake
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.config import LossConfig, ModelConfig
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import jit_train_step

TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=1,
                 num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                 pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _flux_step(cfg, with_inputs=False):
    model = mj.Transformer(mj.FluxConfig.from_diffusers(TINY_FLUX), None)
    tx = make_optimizer(cfg.optim, 10, model.trainable_mask())
    mesh = make_mesh({})
    state, sh = create_state(model, tx, mesh, 0, True)
    state = state._replace(params=jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                                               state.params))
    data = train_fake.FakeTrainData(2, 0)
    step = jit_train_step(model, tx, cfg, mesh, sh, data.text_layout, tuple(map(jnp.asarray, data.null_text)))
    before = jax.device_get((state.params, state.rng))  # the step donates the state
    batch = next(data)
    out = step(state, batch)
    return (out, model, before, batch) if with_inputs else out


def _direct_loss(apply, params, rng, batch, tcfg, guidance):
    """The flow objective written out, with the step's draws (its key split as make_train_step does)."""
    from mmdit_jax.training.objective import draw_noise

    _, key = jax.random.split(rng)
    _, k_noise = jax.random.split(key)
    x0 = np.asarray(batch["latents"], np.float32)
    sigma, eps = (np.asarray(a) for a in draw_noise(k_noise, jnp.asarray(x0), tcfg))
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * eps
    pred = np.asarray(apply(params, x_t, sigma, batch["context"], batch["pooled"],
                            np.full(sigma.shape, guidance, np.float32)), np.float64)
    return float(np.mean((pred - (eps - x0)) ** 2))


@pytest.mark.slow
def test_flux_dev_training_feeds_the_guidance_value_and_bf16_keeps_f32_masters():
    # no text dropout, so the direct objective needs only the step's (sigma, eps) draws
    cfg = train_fake.tiny_config(model=ModelConfig(diffusers_config=TINY_FLUX, compute_dtype="float32"),
                                 loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.0), batch_size=2)
    (_, m1), model, (params, rng), batch = _flux_step(cfg, with_inputs=True)
    _, m4 = _flux_step(cfg.replace(loss=dataclasses.replace(cfg.loss, guidance=4.0)))
    apply = jax.jit(model.apply)
    direct = {g: _direct_loss(apply, params, rng, batch, cfg.timesteps, g) for g in (1.0, 4.0)}
    errs = {g: abs(float(m["loss"]) - direct[g]) / direct[g] for g, m in ((1.0, m1), (4.0, m4))}
    print(f"step loss vs direct, relative error at guidance 1 / 4: {errs[1.0]:.1e} / {errs[4.0]:.1e}; the "
          f"guidance moves the loss by {abs(direct[4.0] - direct[1.0]) / direct[1.0]:.1e}")
    assert abs(direct[4.0] - direct[1.0]) > 2e-4 * direct[1.0]  # the guidance value matters here
    assert errs[1.0] < 1e-6 and errs[4.0] < 1e-6, errs  # and reaches the network as given
    half = cfg.replace(model=dataclasses.replace(cfg.model, compute_dtype="bfloat16"))
    s3, m3 = _flux_step(half)
    assert {x.dtype for x in jax.tree.leaves(s3.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(s3.ema)} == {jnp.dtype(jnp.float32)}
    # bf16 compute: the same loss to bf16 accuracy
    assert abs(float(m3["loss"]) - float(m1["loss"])) < 2e-2 * float(m1["loss"]), (m1["loss"], m3["loss"])
    assert np.isfinite(float(m3["grad_norm"])) and float(m3["grad_norm"]) > 0
