"""The same training step on 1 device and on meshes of 8 virtual CPU devices: (data 8), (fsdp 4, tensor 2),
(data 2, fsdp 2, tensor 2), (sequence 2, fsdp 4) and (fsdp 8) give the same loss, params and EMA (SD3
with QK-norm and an odd joint length; FLUX on the sequence mesh). In the same subprocess (one compile
per mesh): per-device state memory under FSDP 8 from the compiled step's memory analysis, a checkpoint
saved on one mesh restored onto another, and sequence-parallel attention (odd lengths, gradients) against
the unsharded kernel."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import dataclasses, sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import mmdit_jax as mj, train_fake
    from mmdit_jax.attention import attention
    from mmdit_jax.sharding import make_mesh
    from mmdit_jax.training.checkpoints import Checkpointer
    from mmdit_jax.training.config import ModelConfig
    from mmdit_jax.training.optim import make_optimizer
    from mmdit_jax.training.state import create_state
    from mmdit_jax.training.step import batch_sharding, jit_train_step
    assert len(jax.devices()) == 8
    TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=1,
                     num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                     pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6))

    # sequence-parallel attention alone: 13 tokens on 2/4 sequence shards (padded keys masked out)
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((4, 13, 4, 8), np.float32)) for _ in range(3))
    f = lambda q, k, v: (attention(q, k, v) * jnp.cos(q)).sum()
    ref, gref = attention(q, k, v), jax.grad(f, (0, 1, 2))(q, k, v)
    for shape in ({"sequence": 2, "fsdp": 4}, {"sequence": 4, "tensor": 2}):
        mesh = make_mesh(shape)
        with jax.set_mesh(mesh):
            fn = jax.jit(lambda q, k, v: (attention(q, k, v), jax.grad(f, (0, 1, 2))(q, k, v)))
            assert "all-gather" in fn.lower(q, k, v).compile().as_text()
            out, g = fn(q, k, v)
        err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip((out,) + g, (ref,) + gref))
        assert err < 1e-5, (shape, err)

    def run(diffusers_cfg, meshes):
        cfg = train_fake.tiny_config(batch_size=8, model=ModelConfig(diffusers_config=diffusers_cfg,
                                                                     compute_dtype="float32"))
        cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, warmup_steps=0, eps=1e-3))
        fam = mj.FluxConfig if diffusers_cfg is TINY_FLUX else mj.MMDiTConfig
        model = mj.Transformer(fam.from_diffusers(diffusers_cfg), None)
        tx = make_optimizer(cfg.optim, 10, model.trainable_mask())
        data = train_fake.FakeTrainData(8, 0)
        layout, null = data.text_layout, tuple(map(jnp.asarray, data.null_text))
        batch = next(data)
        # initial state with the zero-initialised layers perturbed, so every weight matters; made once
        # on the host and put on every mesh (creating it per mesh would compile per mesh)
        init = mj.Transformer.init(model.config).params
        init = jax.tree.map(lambda x: (np.asarray(x) + 0.02 * np.cos(np.arange(x.size)).reshape(x.shape))
                            .astype(np.float32), init)
        host_state = jax.device_get(create_state(model, tx, make_mesh({}, jax.devices()[:1]), 0, True, init)[0])
        out = {}
        for name, shape in meshes:
            mesh = make_mesh(shape, jax.devices()[:1] if name == "one" else None)
            sh = create_state(model, tx, mesh, 0, True, abstract_only=True)[1]
            state = jax.device_put(host_state, sh)
            b = jax.device_put(batch, batch_sharding(mesh))
            if name == "data2_fsdp2_tensor2":  # moments live where their parameters do
                qkv = lambda t: t["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]["kernel"]
                mu = state.opt_state.inner_states["train"].inner_state[1][0].mu
                assert qkv(state.params).sharding.spec == P(None, "fsdp", None, "tensor") == qkv(mu).sharding.spec
            total = sum(x.nbytes for x in jax.tree.leaves((state, b)))
            step = jit_train_step(model, tx, cfg, mesh, sh, layout, null).lower(state, b).compile()
            if shape.get("sequence", 1) > 1:
                assert "all-gather" in step.as_text()
            if name == "fsdp8":
                per_device = step.memory_analysis().argument_size_in_bytes
                print("MEM", per_device, total, per_device / (total / 8))
                # measured 1.00057 x 1/8 (the few scalars every device holds); one bias left replicated
                # would add more than that
                assert total / 8 <= per_device <= 1.006 * total / 8, (per_device, total / 8)
            for _ in range(2):
                state, m = step(state, b)
            out[name] = (float(m["loss"]), jax.tree.map(np.asarray, (state.params, state.ema)), state, sh)
        l1, t1 = out["one"][:2]
        for name, (l2, t2, _, _) in out.items():
            err = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
                      for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)))
            print(diffusers_cfg["_class_name"], name, l2, err)
            # measured: loss within 1e-7 relative, params and EMA within 2.5e-7
            assert abs(l1 - l2) <= 1e-6 * abs(l1) and err < 3e-6, (name, l1, l2, err)
        return model, tx, out

    run(TINY_FLUX, [("one", {}), ("seq2_fsdp4", {"sequence": 2, "fsdp": 4})])
    model, tx, out = run(train_fake.TINY_SD3, [
        ("one", {}), ("data8", {"data": 8}), ("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}),
        ("data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("seq2_fsdp4", {"sequence": 2, "fsdp": 4}), ("fsdp8", {"fsdp": 8})])

    # saved on (fsdp 4, tensor 2), restored onto (data 2, sequence 2, fsdp 2): values kept, B's shardings
    _, saved, state, _ = out["fsdp4_tensor2"]
    ckpt = Checkpointer(sys.argv[1], 1, 1, True)
    ckpt.save(state, {"data": {"index": 2}}, force=True)
    ckpt.close()
    mesh_b = make_mesh({"data": 2, "sequence": 2, "fsdp": 2})
    target, sh_b = create_state(model, tx, mesh_b, 0, True, abstract_only=True)
    restored, meta = Checkpointer(sys.argv[1], 1, 1, True).restore(target)
    assert meta["data"] == {"index": 2} and int(restored.step) == 2
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves((restored.params, restored.ema))):
        np.testing.assert_array_equal(a, np.asarray(b))
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh_b)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    qkv = restored.params["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.mesh.shape == mesh_b.shape and qkv.sharding.spec == P(None, "fsdp", None, None), qkv.sharding
    print("OK")
""")


@pytest.mark.slow
def test_train_step_matches_across_meshes_and_restores_across_meshes(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    print(res.stdout)
