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
from mmdit_jax.training.config import ModelConfig
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import jit_train_step

TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=1,
                 num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                 pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _flux_step(cfg, state_fn=None):
    model = mj.Transformer(mj.FluxConfig.from_diffusers(TINY_FLUX), None)
    tx = make_optimizer(cfg.optim, 10, model.trainable_mask())
    mesh = make_mesh({})
    state, sh = create_state(model, tx, mesh, 0, True)
    state = state._replace(params=jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                                               state.params))
    data = train_fake.FakeTrainData(2, 0)
    step = jit_train_step(model, tx, cfg, mesh, sh, data.text_layout, tuple(map(jnp.asarray, data.null_text)))
    return step(state, next(data))


@pytest.mark.slow
def test_flux_dev_training_feeds_the_guidance_value_and_bf16_keeps_f32_masters():
    cfg = train_fake.tiny_config(model=ModelConfig(diffusers_config=TINY_FLUX, compute_dtype="float32"),
                                 batch_size=2)
    (_, m1), (_, m2) = _flux_step(cfg), _flux_step(cfg.replace(loss=dataclasses.replace(cfg.loss, guidance=4.0)))
    assert float(m1["loss"]) != float(m2["loss"])  # the guidance value reaches the network
    half = cfg.replace(model=dataclasses.replace(cfg.model, compute_dtype="bfloat16"))
    s3, m3 = _flux_step(half)
    assert {x.dtype for x in jax.tree.leaves(s3.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(s3.ema)} == {jnp.dtype(jnp.float32)}
    # bf16 compute: the same loss to bf16 accuracy
    assert abs(float(m3["loss"]) - float(m1["loss"])) < 2e-2 * float(m1["loss"]), (m1["loss"], m3["loss"])
    assert np.isfinite(float(m3["grad_norm"])) and float(m3["grad_norm"]) > 0
