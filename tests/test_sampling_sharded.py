"""Sampling on 8 (virtual CPU) devices: data parallel (the batch split over all of them), and with
`mesh=` (fsdp 4, tensor 2) and (data 2, sequence 2, tensor 2): parameters sharded by the rules, attention
context parallel; the images equal the single-device ones."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mmdit_jax as mj
from sampling_tiny import flux_pipeline

SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    import mmdit_jax as mj
    from jax.sharding import PartitionSpec as P
    from mmdit_jax.sharding import MESH_AXES
    folder, ref_path = sys.argv[1], sys.argv[2]
    assert len(jax.local_devices()) == 8
    pipe = mj.Pipeline.from_pretrained(folder)
    x = pipe._shard(np.zeros((8, 4, 4, 16), np.float32))
    assert len({s.device for s in x.addressable_shards}) == 8 and x.addressable_shards[0].data.shape[0] == 1
    out = pipe(["a red cat", "big sky"], height=16, width=12, num_inference_steps=3, guidance_scale=3.0,
               seed=3, num_images_per_prompt=4, max_sequence_length=6, output_type="np")
    ref = np.load(ref_path)
    err = float(np.abs(out - ref).max())
    assert err < 1e-5, err
    for mesh in ({"fsdp": 4, "tensor": 2}, {"data": 2, "sequence": 2, "tensor": 2}):
        pipe = mj.Pipeline.from_pretrained(folder, mesh=mesh)
        w = pipe._tparams["single_blocks"]["blocks"]["linear1"]["kernel"]
        want = P(None, "fsdp", None, "tensor") if "fsdp" in mesh else P(None, None, None, "tensor")
        assert w.sharding.spec == want and dict(w.sharding.mesh.shape) == {**dict.fromkeys(MESH_AXES, 1), **mesh}
        out = pipe(["a red cat", "big sky"], height=16, width=12, num_inference_steps=3, guidance_scale=3.0,
                   seed=3, num_images_per_prompt=4, max_sequence_length=6, output_type="np")
        err = float(np.abs(out - ref).max())
        assert err < 1e-5, (mesh, err)
    # the same from the command line: --mesh_* flags shard the transformer; the first prompt's images
    import glob
    from PIL import Image
    from mmdit_jax.cli import sample as cli
    loaded = []
    mj.Pipeline.from_pretrained = (lambda f: lambda *a, **k: loaded.append(f(*a, **k)) or loaded[-1])(
        mj.Pipeline.from_pretrained)
    cli.FLAGS(["mmdit-sample", f"--model={folder}", "--prompt=a red cat", "--height=16", "--width=12",
               "--steps=3", "--guidance=3.0", "--seed=3", "--num_images=4", "--max_sequence_length=6",
               "--mesh_fsdp=4", "--mesh_tensor=2", "--noprogress", f"--out={sys.argv[3]}"])
    cli._sample()
    w = loaded[0]._tparams["single_blocks"]["blocks"]["linear1"]["kernel"]
    assert w.sharding.spec == P(None, "fsdp", None, "tensor"), w.sharding
    pngs = sorted(glob.glob(sys.argv[3] + "/*.png"))
    got = np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in pngs])
    assert len(pngs) == 4 and float(np.abs(got - ref[:4]).max()) <= 1 / 255 + 1e-6
    print("OK", err)
""")


@pytest.mark.slow
def test_batch_spread_over_eight_devices_gives_the_same_images(tmp_path):
    _, folder = flux_pipeline(tmp_path, seed=70)
    ref = mj.Pipeline.from_pretrained(folder)(["a red cat", "big sky"], height=16, width=12, num_inference_steps=3,
                                             guidance_scale=3.0, seed=3, num_images_per_prompt=4,
                                             max_sequence_length=6, output_type="np")
    np.save(tmp_path / "ref.npy", ref)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT, folder, str(tmp_path / "ref.npy"), str(tmp_path / "cli")],
                         env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
