"""Memory bound of the converter: a FLUX-shaped checkpoint of about 1 GB (float32 once converted) is
converted in a fresh process whose peak RSS grows by less than its largest stacked array plus the
writer's batch and a fixed allowance, well under the model's size, so the model is never held whole.
Restoring the result needs the model's size plus a bounded allowance (not twice the model)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mmdit_jax.conversion.synthetic import checkpoint_specs, write_random_checkpoint
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.io.orbax_io import FLUSH_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# hidden 1024, 12 single blocks: the single blocks' linear1 kernels stack to 12 x 1024 x 7168 float32
CONFIG = dict(num_heads=8, head_dim=128, depth=2, depth_single=12, context_dim=1024, pooled_dim=256,
              axes_dim=(16, 56, 56))
# imports, thread pools and allocator slack of a process that has already run jax and Orbax once
ALLOWANCE = 300 << 20

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import jax, numpy as np
    import mmdit_jax as mj
    from mmdit_jax.conversion.to_orbax import convert
    from mmdit_jax.io.orbax_io import ParamsWriter
    src, out, mode = sys.argv[1:4]
    # warm up every library the run uses (jax arrays, Orbax partial save + finalize, restore) on a
    # tiny tree, so the baseline holds their fixed costs and the growth is what the data needs
    warm = out + ".warm-" + mode
    w = ParamsWriter(warm); w.add(("a",), np.ones(8, np.float32)); w.close()
    from mmdit_jax.io import orbax_io
    orbax_io.restore_params(warm, {"a": jax.ShapeDtypeStruct((8,), np.float32)})
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base, t = rss(), time.monotonic()
    if mode == "convert":
        convert(src, out, "float32")
    else:
        model = mj.load_transformer(out)
        jax.block_until_ready(model.params)
    print(json.dumps({"base": base, "peak": rss(), "seconds": time.monotonic() - t}))
""")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_conversion_memory_is_bounded_by_the_largest_stacked_array(tmp_path):
    cfg = FluxConfig(**CONFIG)
    specs = checkpoint_specs(cfg, "original", "bfloat16")
    src = str(tmp_path / "flux.safetensors")
    write_random_checkpoint(src, specs)
    model_bytes = sum(int(np.prod(s)) for _, s, _ in specs) * 4  # converted to float32
    largest = cfg.depth_single * cfg.hidden_size * (3 * cfg.hidden_size + cfg.mlp_hidden) * 4
    bound = largest + FLUSH_BYTES + ALLOWANCE
    assert model_bytes > bound + (200 << 20), "the checkpoint must be big enough for the bound to matter"

    conv = _run(src, str(tmp_path / "out"), "convert")
    grew = conv["peak"] - conv["base"]
    print(f"model {model_bytes / 2**20:.0f} MiB, largest stacked {largest / 2**20:.0f} MiB; conversion grew "
          f"{grew / 2**20:.0f} MiB over a {conv['base'] / 2**20:.0f} MiB baseline in {conv['seconds']:.1f} s")
    assert grew < bound, (grew, bound)

    load = _run(src, str(tmp_path / "out"), "load")
    grew = load["peak"] - load["base"]
    print(f"restore grew {grew / 2**20:.0f} MiB in {load['seconds']:.1f} s")
    assert grew < model_bytes + largest + ALLOWANCE, (grew, model_bytes)
