"""load_transformer(path, mesh=...) places every parameter on its logical-axis sharding, from an Orbax
folder (restored straight into the sharding) and from safetensors alike, with the same values as an
unsharded load (8 virtual CPU devices in a subprocess)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    import mmdit_jax as mj
    from mmdit_jax.conversion.to_orbax import convert
    from mmdit_jax.sharding import make_mesh
    sys.path.insert(0, sys.argv[2])
    from sd3_oracle import tiny_model
    tmp = sys.argv[1]
    tiny_model(seed=3, qk_norm="rms_norm", dual_attention_layers=(1,)).save_pretrained(tmp + "/diff")
    convert(tmp + "/diff", tmp + "/orbax")
    assert len(jax.devices()) == 8
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    ref = mj.load_transformer(tmp + "/diff")
    want = ref.param_shardings(mesh)
    for src in ("/orbax", "/diff"):
        for dtype in ("float32", "bfloat16"):
            m = mj.load_transformer(tmp + src, dtype=dtype, mesh=mesh)
            for (p, a), r, s in zip(jax.tree_util.tree_leaves_with_path(m.params), jax.tree.leaves(ref.params),
                                    jax.tree.leaves(want)):
                assert a.sharding.is_equivalent_to(s, a.ndim), (src, p, a.sharding, s)
                assert np.array_equal(np.asarray(a), np.asarray(r).astype(a.dtype)), (src, p)
    qkv = m.params["groups"][1]["blocks"]["x_block"]["attn"]["qkv"]["kernel"]
    assert len({sh.data.shape for sh in qkv.addressable_shards}) == 1
    assert qkv.addressable_shards[0].data.shape[1] * 4 == qkv.shape[1]  # split over fsdp
    print("OK")
""")


def test_sharded_load_from_orbax_and_safetensors(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), os.path.join(root, "tests")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
