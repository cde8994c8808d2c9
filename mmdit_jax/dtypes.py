"""Parameter and activation dtypes by name, for every component (transformer, text encoders, VAE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdit_jax.errors import MMDiTError

# float64 exists for exactness checks against float64 oracles (needs jax_enable_x64).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def parse_dtype(dtype) -> type:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise MMDiTError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise MMDiTError("dtype float64 needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))")
    return DTYPES[name]
