"""Timestep samplers follow their densities (Kolmogorov-Smirnov against CDFs written here, fixed seed),
and the shift matches the SD3 formula and diffusers' FLUX calculate_shift."""
import math

import jax
import numpy as np
import pytest

from mmdit_jax.training.config import TimestepConfig
from mmdit_jax.training.timesteps import apply_shift, sample_sigmas, shift_factor

N = 20000
KS_CRIT = 1.95 / math.sqrt(N)  # alpha = 0.001


def _phi(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _mode_inverse(t, a):
    """u with 1 - u - a(cos^2(pi u/2) - 1 + u) = t (decreasing in u for |a| small enough): bisection."""
    lo, hi = np.zeros_like(t), np.ones_like(t)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - a * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = np.where(f > t, mid, lo), np.where(f > t, hi, mid)
    return (lo + hi) / 2


def cdf(cfg, x):
    """P(sigma <= x) for the unshifted sampler."""
    x = np.clip(x, 1e-12, 1 - 1e-12)
    if cfg.sampler == "uniform":
        return x
    if cfg.sampler == "logit_normal":
        return _phi((np.log(x / (1 - x)) - cfg.logit_mean) / cfg.logit_std)
    if cfg.sampler == "mode":
        return 1 - _mode_inverse(x, cfg.mode_scale)
    if cfg.sampler == "cosmap":
        return 2 / np.pi * np.arctan(x / (1 - x))
    raise AssertionError(cfg.sampler)


def shifted_cdf(cfg, x, a):
    return cdf(cfg, x / (a - (a - 1) * x))  # the shift's inverse map


def ks(samples, cdf_fn):
    s = np.sort(np.asarray(samples, np.float64))
    f = cdf_fn(s)
    n = len(s)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


CASES = [TimestepConfig(sampler="uniform"), TimestepConfig(sampler="logit_normal"),
         TimestepConfig(sampler="logit_normal", logit_mean=-0.5, logit_std=1.7),
         TimestepConfig(sampler="mode", mode_scale=1.29), TimestepConfig(sampler="mode", mode_scale=-0.7),
         TimestepConfig(sampler="cosmap")]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.sampler}-{c.logit_mean}-{c.logit_std}-{c.mode_scale}")
def test_samplers_match_their_cdfs(cfg):
    s = np.asarray(sample_sigmas(jax.random.PRNGKey(0), N, cfg, (32, 32)))
    assert s.dtype == np.float32 and s.min() >= 0 and s.max() <= 1
    assert ks(s, lambda x: cdf(cfg, x)) < KS_CRIT
    # the test has power: the same samples are rejected under another sampler's CDF
    other = TimestepConfig(sampler="uniform" if cfg.sampler != "uniform" else "cosmap")
    assert ks(s, lambda x: cdf(other, x)) > 3 * KS_CRIT


@pytest.mark.parametrize("shift", ["fixed", "resolution", "flux"])
def test_shifted_samples_match_the_shifted_cdf(shift):
    cfg = TimestepConfig(sampler="logit_normal", shift=shift, shift_value=2.0, reference_resolution=256)
    hw = (96, 64)
    a = shift_factor(cfg, hw)
    s = np.asarray(sample_sigmas(jax.random.PRNGKey(1), N, cfg, hw))
    assert ks(s, lambda x: shifted_cdf(cfg, x, a)) < KS_CRIT
    assert ks(s, lambda x: cdf(cfg, x)) > 5 * KS_CRIT  # the shift moved the mass


def test_shift_values():
    assert shift_factor(TimestepConfig(shift="none"), (128, 128)) == 1.0
    assert shift_factor(TimestepConfig(shift="fixed", shift_value=3.0), (128, 128)) == 3.0
    # sqrt(m/n): 1024^2 pixels against the 256^2 reference is 4x the reference's shift
    res = TimestepConfig(shift="resolution", shift_value=1.5, reference_resolution=256)
    assert shift_factor(res, (128, 128)) == pytest.approx(6.0)
    assert shift_factor(res, (32, 32)) == pytest.approx(1.5)
    # SD3's map: a*s / (1 + (a-1)*s) fixes 0 and 1 and sends 1/2 to a/(1+a)
    np.testing.assert_allclose(np.asarray(apply_shift(np.array([0.0, 0.5, 1.0]), 3.0)), [0, 0.75, 1])


def test_flux_shift_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = TimestepConfig(shift="flux")
    for hw in ((128, 128), (64, 96), (32, 32), (16, 24)):
        tokens = (hw[0] // 2) * (hw[1] // 2)
        mu = calculate_shift(tokens, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)
        assert shift_factor(cfg, hw) == pytest.approx(math.exp(mu), rel=1e-12)
        # FLUX's time_shift e^mu / (e^mu + (1/s - 1)) is the same map
        s = np.linspace(0.05, 0.95, 7)
        np.testing.assert_allclose(np.asarray(apply_shift(s, math.exp(mu))),
                                   math.exp(mu) / (math.exp(mu) + (1 / s - 1)), rtol=1e-6)


@pytest.mark.parametrize("side", [512, 1024, 2048])
def test_resolution_shift_is_the_sd3_papers(side):
    # SD3 paper: shift 3.0 at 1024x1024, times sqrt(m / n) for m pixels against n = 1024^2
    expected = {512: 1.5, 1024: 3.0, 2048: 6.0}[side]
    cfg = TimestepConfig(shift="resolution", shift_value=3.0)  # default reference resolution
    assert shift_factor(cfg, (side // 8, side // 8)) == pytest.approx(expected)
    assert shift_factor(cfg, (side // 8, side // 16)) == pytest.approx(expected / math.sqrt(2))


@pytest.mark.parametrize("sampler", ["uniform", "cosmap", "logit_normal"])
def test_the_extreme_draw_keeps_sigma_above_zero(sampler, monkeypatch):
    import jax.numpy as jnp

    from mmdit_jax.training.objective import flow_loss

    # the smallest draws the samplers can get: u = 0, and a normal so low that sigmoid gives 0
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype))
    monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype=jnp.float32: jnp.full(shape, -200.0, dtype))
    cfg = TimestepConfig(sampler=sampler, shift="fixed", shift_value=3.0)
    s = sample_sigmas(jax.random.PRNGKey(0), 4, cfg, (16, 16))
    assert float(s.min()) > 0
    x0 = jnp.ones((4, 2, 2, 1))
    loss = flow_loss(lambda p, x, *a: x, None, x0, -x0, s, None, None, None, "sigma_sqrt")
    assert np.isfinite(float(loss))
