"""One training step on a (data 2, fsdp 2, tensor 2) mesh of 8 virtual CPU devices gives the loss and
updated parameters of the single-device step; the state is created sharded. Also: FLUX-dev training
feeds the configured guidance value, and bf16 compute keeps float32 master weights."""
import dataclasses
import os
import subprocess
import sys
import textwrap

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    import mmdit_jax as mj, train_fake
    from mmdit_jax.sharding import make_mesh
    from mmdit_jax.training.optim import make_optimizer
    from mmdit_jax.training.state import create_state
    from mmdit_jax.training.step import jit_train_step
    assert len(jax.devices()) == 8
    cfg = train_fake.tiny_config(batch_size=8)
    cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, warmup_steps=0, eps=1e-3))
    model = mj.Transformer(mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), None)
    tx = make_optimizer(cfg.optim, 10, model.trainable_mask())
    data = train_fake.FakeTrainData(8, 0)
    layout, null = data.text_layout, tuple(map(jnp.asarray, data.null_text))
    batch = next(data)
    out = {}
    for name, mesh in (("one", make_mesh({}, jax.devices()[:1])),
                       ("mesh", make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
        state, sh = create_state(model, tx, mesh, 0, True)
        # perturb the zero-initialised layers (same values on both meshes) so every weight matters
        state = state._replace(params=jax.tree.map(
            lambda x: x + 0.02 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), state.params))
        step = jit_train_step(model, tx, cfg, mesh, sh, layout, null)
        qkv = state.params["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]["kernel"]
        if name == "mesh":
            assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), qkv.sharding.spec
            mu = state.opt_state.inner_states["train"].inner_state[1][0].mu
            assert mu["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]["kernel"].sharding.spec == qkv.sharding.spec
        for _ in range(2):
            b = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                 ("data", "fsdp") if name == "mesh" else None))) for k, v in batch.items()}
            state, m = step(state, b)
        out[name] = (float(m["loss"]), jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.ema))
    (l1, p1, e1), (l2, p2, e2) = out["one"], out["mesh"]
    assert abs(l1 - l2) <= 1e-5 * abs(l1), (l1, l2)
    err = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
              for a, b in zip(jax.tree.leaves(p1) + jax.tree.leaves(e1), jax.tree.leaves(p2) + jax.tree.leaves(e2)))
    assert err < 1e-5, err
    print("OK", l1, l2, err)
""")


@pytest.mark.slow
def test_train_step_on_an_8_device_mesh_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


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
