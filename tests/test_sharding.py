"""Logical-axis rules and a sharded forward on 8 virtual CPU devices."""
import os
import subprocess
import sys
import textwrap

from jax.sharding import PartitionSpec as P

from mmdit_jax.sharding import logical_to_spec


def test_rules_map_logical_names_to_mesh_axes():
    assert logical_to_spec(("layers", "embed", "qkv")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), "sequence", None)
    assert logical_to_spec((None, "mlp")) == P(None, "tensor")


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import mmdit_jax as mj
    from mmdit_jax.sd3.config import MMDiTConfig
    from mmdit_jax.sharding import make_mesh
    cfg = MMDiTConfig(num_layers=3, num_heads=4, head_dim=16, context_dim=24, pooled_dim=8,
                      pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))
    tm = mj.Transformer.init(cfg, seed=0)
    # non-zero adaLN and output layers so the forward is not trivially zero
    tm.params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), tm.params)
    r = np.random.default_rng(0)
    x = (r.standard_normal((4, 6, 4, 16), np.float32), np.full((4,), 0.5, np.float32),
         r.standard_normal((4, 5, 24), np.float32), r.standard_normal((4, 8), np.float32))
    ref = np.asarray(tm(*x))
    assert len(jax.devices()) == 8
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shard = tm.param_shardings(mesh)
    params = jax.device_put(tm.params, shard)
    qkv = params["groups"][1]["blocks"]["x_block"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), qkv.sharding.spec
    assert qkv.addressable_shards[0].data.shape == (1, 32, 96)
    out = jax.jit(tm.apply)(params, *x)
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    assert err < 1e-5, err
    print("OK", err)
""")


def test_sharded_forward_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
