"""Shared test helpers. Oracles (torch, diffusers, transformers) are imported lazily by the tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compare against float32 oracles: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def randomize_torch_(module, std=0.3, seed=0, buffers=()):
    """Overwrite every parameter (and the named buffers) of a torch module with N(0, std^2) so no
    zero-initialised layer hides a bug. Biases and norm scales included."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        named = dict(module.named_buffers())
        for b in buffers:
            named[b].copy_(torch.randn(named[b].shape, generator=g))
    return module


def max_rel_err(out, ref):
    """max |out - ref| divided by max |ref| (the 'within 1e-5 of the output scale' measure)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
