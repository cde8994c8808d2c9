"""Text encoders at pod scale, on 8 (virtual CPU) devices: loaded in the compute dtype and sharded by the
logical-axis rules (about 1/8 of their bytes per device under fsdp 8), for sampling (`mesh=`) and for
training (the data pipeline's encoders, over the local devices); the Pipeline holds one copy of the
transformer."""
import os
import subprocess
import sys
import textwrap
import types

import pytest

from sampling_tiny import flux_pipeline

SCRIPT = textwrap.dedent("""
    import gc, sys
    import jax, jax.numpy as jnp, numpy as np
    import mmdit_jax as mj
    from mmdit_jax.data.encode import load_encoders
    from mmdit_jax.sharding import make_mesh
    folder = sys.argv[1]
    dev0 = jax.devices()[0]

    def on_dev0(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                   if s.device == dev0)

    def whole(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    def check(enc, dtype, what):
        for name in ("clip", "t5"):
            params = getattr(enc, name).params
            per, total = on_dev0(params), whole(params)
            print(what, name, "bytes on device 0:", per, "of", total)
            assert per <= 1.25 * total / 8, (what, name, per, total)
            dtypes = {"/".join(map(str, k)): x.dtype for k, x in jax.tree_util.tree_leaves_with_path(params)}
            # T5 keeps its feed-forward output weights in float32 in every dtype (precision; see t5.py)
            assert {d for k, d in dtypes.items() if "wo" not in k} == {jnp.dtype(dtype)}, (what, dtypes)

    # one copy of the transformer (and VAE): device 0 holds only what the pipeline's components hold
    # (first, while nothing else is alive)
    pipe = mj.Pipeline.from_pretrained(folder, "float32")
    gc.collect()
    live = sum(on_dev0([x]) for x in jax.live_arrays())
    held = on_dev0([pipe.transformer.params, pipe.vae.params, pipe.text_encoders.clip.params,
                    pipe.text_encoders.t5.params])
    print("device 0 bytes: live", live, "held by the pipeline", held, "transformer", on_dev0(pipe._tparams))
    assert live == held, (live, held)

    # sampling: the Pipeline's mesh shards the text encoders too
    mesh = make_mesh({"fsdp": 8})
    check(mj.load_text_encoders(folder, "bfloat16", mesh=mesh), "bfloat16", "load_text_encoders")
    check(mj.Pipeline.from_pretrained(folder, "bfloat16", mesh={"fsdp": 8}).text_encoders, "bfloat16", "pipeline")
    # training: the data pipeline's encoders split over this process's devices, and encode as unsharded ones
    enc = load_encoders(folder, "float32", 6)
    check(enc.text, "float32", "training encoders")
    ctx, pooled = enc.encode_text(["a red cat", "big sky"])
    one = mj.load_text_encoders(folder, "float32")
    want_ctx, want_pooled = one(["a red cat", "big sky"], max_sequence_length=6)
    assert np.abs(ctx - np.asarray(want_ctx)).max() < 1e-5 and np.abs(pooled - np.asarray(want_pooled)).max() < 1e-5

    print("OK")
""")


@pytest.mark.slow
def test_encoders_sharded_in_compute_dtype_and_one_transformer_copy(tmp_path):
    _, folder = flux_pipeline(tmp_path, seed=80)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT, folder], env=env, capture_output=True, text=True,
                         timeout=600)
    print(res.stdout)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


def test_training_data_encodes_in_the_compute_dtype():
    """The trainer's data (and so its on-the-fly encoders) get the model's compute dtype."""
    from mmdit_jax.training.data import make_data, register_data_factory

    seen = {}
    register_data_factory("record_dtype", lambda data_cfg, **kw: seen.update(kw) or "data")
    cfg = types.SimpleNamespace(batch_size=2, data_factory="record_dtype", data=None,
                                model=types.SimpleNamespace(compute_dtype="bfloat16"))
    assert make_data(cfg, seed=0, encoders_path="x", process_index=0, process_count=1) == "data"
    assert seen["dtype"] == "bfloat16"
