"""`mmdit-info` / `python -m mmdit_jax.info`: what this installation sees, for bug reports.

Prints package versions, the JAX backend with its devices and processes, the attention kernel that
"auto" picks for float32 and bfloat16 inputs, and the environment settings that change how XLA runs.
It initialises the backend (that is the point: a GPU or TPU that JAX cannot see shows up here as "cpu"),
but starts no distributed run and allocates nothing."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "flax", "optax",
            "orbax-checkpoint", "numpy", "ml_dtypes", "transformers", "safetensors", "grain", "mmdit-jax")
# Environment variables that change what XLA compiles or which devices JAX uses.
ENV_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TPU_", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def report() -> list[str]:
    """The lines `mmdit-info` prints."""
    import jax
    import jax.numpy as jnp

    from mmdit_jax.attention import _resolve, default_backend

    lines = [f"python: {platform.python_version()} ({sys.platform}, {platform.machine()})"]
    for name in PACKAGES:
        version = _version(name)
        if version is not None or name in ("jax", "jaxlib", "flax", "orbax-checkpoint"):
            lines.append(f"{name}: {version or 'not installed'}")
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    lines += [
        f"backend: {jax.default_backend()}",
        f"devices: {len(devices)} ({', '.join(kinds)}); local: {jax.local_device_count()}",
        f"processes: {jax.process_count()} (this is process {jax.process_index()})",
        f"attention: backend setting {default_backend()!r} -> float32 inputs use "
        f"{_resolve(default_backend(), jnp.float32)!r}, bfloat16 inputs use "
        f"{_resolve(default_backend(), jnp.bfloat16)!r}",
    ]
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    lines.append("environment:" + ("" if env else " none set"))
    lines += [f"  {k}={v}" for k, v in env]
    return lines


def main() -> None:
    print("\n".join(report()))


def run() -> None:
    """Console-script entry point (`mmdit-info`)."""
    main()


if __name__ == "__main__":
    main()
