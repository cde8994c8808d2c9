"""Random checkpoints of any configuration written straight to disk, for memory and speed measurements
(the FLUX.1-dev conversion benchmark, the converter's memory test): keys and shapes come from the key
plan, values from a small random pool, one tensor at a time, so writing 24 GB needs no 24 GB."""
from __future__ import annotations

import numpy as np

from mmdit_jax.families import family_of_config
from mmdit_jax.io import rules
from mmdit_jax.io.safetensors_io import SafetensorsWriter
from mmdit_jax.structure import Structure


def checkpoint_specs(config, layout: str = "original", dtype="bfloat16", prefix: str = ""):
    """[(key, shape, numpy dtype)] of `config`'s transformer checkpoint in `layout`."""
    import jax.numpy as jnp

    from mmdit_jax.transformer import abstract_module

    dt = np.dtype(jnp.dtype(dtype))
    template = Structure(abstract_module(config)).abstract_params()
    flat = {path: t for path, t in rules._flat_shapes(template).items()}
    patch = getattr(config, "patch_size", None)
    return [(prefix + k, s, dt) for entry in family_of_config(config).plan(config)
            for k, s in rules.export_specs(entry, flat[entry.path].shape, layout, patch)]


def write_random_checkpoint(path: str, specs, seed: int = 0, pool_elems: int = 1 << 24, on_tensor=None):
    """A .safetensors file of `specs` filled with N(0, 0.02^2) values cycled from a random pool."""
    pool = (np.random.default_rng(seed).standard_normal(pool_elems, np.float32) * 0.02)
    pools = {}
    w = SafetensorsWriter(path, specs, {"format": "pt"})
    try:
        for i, (k, shape, dt) in enumerate(specs):
            src = pools.setdefault(dt, pool.astype(dt))
            n = int(np.prod(shape, dtype=np.int64))
            start = (i * 7919) % pool_elems  # a different window per tensor
            reps = -(-(start + n) // pool_elems)
            data = np.tile(src, reps)[start:start + n] if reps > 1 else src[start:start + n]
            w.write(k, data.reshape(shape))
            del data
            if on_tensor is not None:
                on_tensor(i + 1, len(specs))
    except BaseException:
        w.abort()
        raise
    w.close()
