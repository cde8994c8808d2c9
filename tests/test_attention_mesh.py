"""Attention on 8 virtual CPU devices. Splash (Pallas interpret mode) under (fsdp 8) and (data 2, fsdp 2,
tensor 2) equals XLA for forward and gradient; with a "sequence" axis and padded lengths both kernels mask
the padded keys inside the memory-lean path. Structurally: every `pallas_call` of the train step, the
validation loss, the trainer's sample grids and the Pipeline's sampling loop traced with splash under a
multi-device mesh sits inside a `shard_map` (Mosaic kernels cannot be partitioned by XLA)."""
import os
import subprocess
import sys
import textwrap

import pytest

from sampling_tiny import flux_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    import mmdit_jax as mj, train_fake
    from mmdit_jax.attention import attention, attention_backend
    from mmdit_jax.sharding import make_mesh
    from mmdit_jax.training.optim import make_optimizer
    from mmdit_jax.training.state import create_state
    from mmdit_jax.training.step import batch_sharding, jit_train_step, make_eval_loss
    assert len(jax.devices()) == 8

    def walk(jaxpr, inside=False):
        for eqn in jaxpr.eqns:
            yield eqn, inside
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub, inside or eqn.primitive.name == "shard_map")

    def kernels_outside_shard_map(jaxpr):
        places = [inside for eqn, inside in walk(jaxpr) if eqn.primitive.name == "pallas_call"]
        assert places, "no pallas_call traced"
        return places.count(False)

    # kernels alone: 21 tokens (padded to 24 on the sequence axis), 4 heads, batch 8
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((8, 21, 4, 16), np.float32)) for _ in range(3))
    cot = jnp.cos(q)
    f = lambda q, k, v: (attention(q, k, v) * cot).sum()
    ref = jax.value_and_grad(f, (0, 1, 2))(q, k, v)
    cases = [({"fsdp": 8}, "splash"), ({"data": 2, "fsdp": 2, "tensor": 2}, "splash"),
             ({"sequence": 4, "fsdp": 2}, "splash"), ({"sequence": 4, "tensor": 2}, "xla")]
    for shape, backend in cases:
        with jax.set_mesh(make_mesh(shape)), attention_backend(backend):
            fn = jax.jit(jax.value_and_grad(f, (0, 1, 2)))
            if backend == "splash":
                assert kernels_outside_shard_map(fn.trace(q, k, v).jaxpr) == 0, shape
            else:  # padded keys masked inside the lse kernel: it is the one traced, and backward keeps
                # no (B, H, L, L) probabilities
                jaxpr = jax.make_jaxpr(lambda q, k, v: attention(q, k, v))(q, k, v).jaxpr
                assert any(e.primitive.name == "custom_vjp_call" for e, inside in walk(jaxpr) if inside)
                _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v), q, k, v)
                probs = [x.shape for x in jax.tree.leaves(vjp) if np.shape(x)[-1:] == (24,)]  # (.., Lq, padded Lk)
                assert not probs, probs
            out = fn(q, k, v)
        err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
        assert err < 1e-5, (shape, backend, err)
        print(shape, backend, err)

    # the train step and the validation loss, traced with splash under (fsdp 8)
    cfg = train_fake.tiny_config(batch_size=8)
    model = mj.Transformer(mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), None)
    tx = make_optimizer(cfg.optim, 10, model.trainable_mask())
    mesh = make_mesh({"fsdp": 8})
    state, sh = create_state(model, tx, mesh, 0, True, abstract_only=True)
    batch = {key: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=batch_sharding(mesh))
             for key, x in next(train_fake.FakeTrainData(8, 0)).items() if key in ("latents", "context", "pooled")}
    with attention_backend("splash"):
        step = jit_train_step(model, tx, cfg, mesh, sh)
        assert kernels_outside_shard_map(step.trace(state, batch).jaxpr) == 0
        sigma = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=batch_sharding(mesh))
        eps = jax.ShapeDtypeStruct(batch["latents"].shape, jnp.float32, sharding=batch_sharding(mesh))
        loss = make_eval_loss(model, cfg, mesh=mesh)
        assert kernels_outside_shard_map(jax.make_jaxpr(loss)(state.params, batch, sigma, eps).jaxpr) == 0

    # the trainer's sample grids: the jitted sampling loop, traced (encoders and VAE stand-ins give shapes)
    import dataclasses, types
    from mmdit_jax.training import loop
    jitted = []
    loop.jax = types.SimpleNamespace(**{n: getattr(jax, n) for n in ("random", "numpy")},
                                     jit=lambda fn: jitted.append(fn) or jax.jit(fn))
    encode_text = lambda prompts: (np.zeros((len(prompts), 5, 12), np.float32),
                                   np.zeros((len(prompts), 10), np.float32))
    vae = types.SimpleNamespace(config=types.SimpleNamespace(downsample_factor=8, latent_channels=16))
    data = types.SimpleNamespace(encoders=types.SimpleNamespace(encode_text=encode_text, vae=vae))
    cfg = cfg.replace(log=dataclasses.replace(cfg.log, sample_every=1, sample_steps=2, sample_resolution=48))
    loop._sampler(cfg, model, None, data, None, None, mesh)
    loop.jax = jax
    with attention_backend("splash"):
        assert kernels_outside_shard_map(jax.make_jaxpr(jitted[-1])(state.params, None).jaxpr) == 0

    # the Pipeline's sampling loop on its default data mesh and on (fsdp 4, tensor 2)
    for mesh in (None, {"fsdp": 4, "tensor": 2}):
        pipe = mj.Pipeline.from_pretrained(sys.argv[1], mesh=mesh)
        traced = []
        denoise = pipe._denoise
        def record(*args, **kw):
            traced.append(denoise.trace(*args, **kw).jaxpr)
            return args[1]
        pipe._denoise = record
        with attention_backend("splash"):
            pipe(["a red cat"], height=16, width=16, num_inference_steps=2, guidance_scale=3.0,
                 num_images_per_prompt=3, max_sequence_length=6, output_type="latent")
        assert len(traced) == 1 and kernels_outside_shard_map(traced[0]) == 0, mesh
    print("OK")
""")


@pytest.mark.slow
def test_splash_runs_in_shard_map_on_every_mesh(tmp_path):
    _, folder = flux_pipeline(tmp_path, seed=71)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT, folder], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    print(res.stdout)
