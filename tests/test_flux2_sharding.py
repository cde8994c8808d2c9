"""FLUX.2 on 8 virtual CPU devices (data 2 x fsdp 2 x tensor 2): every parameter carries logical axis
names, the fused projections split by heads / MLP chunks over "tensor", and the sharded forward (with a
reference) and its gradient match one device."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import mmdit_jax as mj
    from mmdit_jax.flux2.config import Flux2Config
    from mmdit_jax.sharding import make_mesh
    from mmdit_jax.transformer import abstract_module

    cfg = Flux2Config(in_channels=12, out_channels=12, num_heads=4, head_dim=16, depth=2, depth_single=2,
                      context_dim=24, axes_dim=(4, 4, 4, 4), time_channels=32, guidance_embed=True)
    names = [v.get_metadata().get("out_sharding") for v in jax.tree.leaves(
        nnx.state(abstract_module(cfg), nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))]
    assert names and all(n and len(n) > 0 for n in names), names
    tm = mj.Transformer.init(cfg, seed=0)
    # non-zero adaLN and output layers so the forward is not trivially zero
    tm.params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), tm.params)
    r = np.random.default_rng(0)
    lat, sigma = r.standard_normal((4, 3, 5, 12), np.float32), np.full((4,), 0.5, np.float32)
    ctx, g = r.standard_normal((4, 5, 24), np.float32), np.full((4,), 3.0, np.float32)
    refs = [r.standard_normal((4, 2, 3, 12), np.float32)]

    def loss(p, lat):
        return jnp.mean(jnp.cos(tm.apply(p, lat, sigma, ctx, None, g, references=refs, remat="full")))

    ref_out = np.asarray(tm(lat, sigma, ctx, None, g, references=refs))
    ref_grad = jax.jit(jax.grad(loss))(tm.params, lat)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = jax.device_put(tm.params, tm.param_shardings(mesh))
    linear1 = params["single_blocks"]["blocks"]["linear1"]["kernel"]  # (layers, in, 3 + 2m, width)
    assert linear1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor"), linear1.sharding.spec
    assert linear1.addressable_shards[0].data.shape == (2, 32, 9, 32)
    out = jax.jit(tm.apply)(params, lat, sigma, ctx, None, g, references=refs)
    err = float(np.abs(np.asarray(out) - ref_out).max() / np.abs(ref_out).max())
    grad = jax.jit(jax.grad(loss))(params, lat)
    gerr = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-30))
               for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
    assert err < 1e-5 and gerr < 1e-5, (err, gerr)
    print("OK", err, gerr)
""")


@pytest.mark.slow  # a subprocess compiling the sharded forward and backward
def test_sharded_forward_and_gradient_match_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    print(res.stdout.strip())
