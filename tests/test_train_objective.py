"""The rectified-flow loss equals a direct numpy computation for every sampler and weighting; weightings
match diffusers' compute_loss_weighting_for_sd3; text dropout zeroes exactly the dropped segments."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmdit_jax.training import objective
from mmdit_jax.training.config import TimestepConfig

Seg = collections.namedtuple("Seg", "name rows channels pooled")


def _apply(params, x_t, sigma, context, pooled, guidance):
    # a stand-in network whose output depends on every input, mirrored in numpy below
    g = 0.0 if guidance is None else guidance[:, None, None, None]
    return (jnp.tanh(x_t * params["w"] + sigma[:, None, None, None]) + context.mean((1, 2))[:, None, None, None]
            + pooled.mean(1)[:, None, None, None] * g)


def _np_loss(w, x0, eps, sigma, ctx, pooled, guidance, weighting):
    s = sigma.astype(np.float64)[:, None, None, None]
    x_t = (1 - s) * x0 + s * eps
    pred = np.tanh(x_t * w + s) + ctx.mean((1, 2))[:, None, None, None] + pooled.mean(1)[:, None, None, None] * \
        guidance[:, None, None, None]
    err = ((pred - (eps - x0)) ** 2).mean((1, 2, 3))
    sig = sigma.astype(np.float64)
    weight = {"none": np.ones_like(sig), "sigma_sqrt": sig ** -2.0,
              "cosmap": 2 / (np.pi * (1 - 2 * sig + 2 * sig ** 2))}[weighting]
    return float((weight * err).mean())


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("sampler", ["uniform", "logit_normal", "mode", "cosmap"])
def test_loss_matches_direct_computation(sampler, weighting):
    r = np.random.default_rng(0)
    x0 = r.standard_normal((3, 6, 4, 5)).astype(np.float32)
    ctx = r.standard_normal((3, 7, 9)).astype(np.float32)
    pooled = r.standard_normal((3, 11)).astype(np.float32)
    guidance = np.array([1.0, 3.5, 0.5], np.float32)
    tcfg = TimestepConfig(sampler=sampler, shift="fixed", shift_value=3.0)
    sigma, eps = objective.draw_noise(jax.random.PRNGKey(4), jnp.asarray(x0), tcfg)
    sigma, eps = np.asarray(sigma), np.asarray(eps)
    assert sigma.shape == (3,) and eps.shape == x0.shape and len(set(sigma.tolist())) == 3
    loss = objective.flow_loss(_apply, {"w": 0.7}, x0, eps, sigma, ctx, pooled, guidance, weighting)
    ref = _np_loss(0.7, x0, eps, sigma, ctx, pooled, guidance, weighting)
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref), (float(loss), ref)


def test_weightings_match_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = np.linspace(0.02, 0.98, 17).astype(np.float32)
    for name in ("sigma_sqrt", "cosmap", "none"):
        ref = compute_loss_weighting_for_sd3(name, torch.tensor(sigma)).numpy()
        ref = np.broadcast_to(ref, sigma.shape)
        np.testing.assert_allclose(np.asarray(objective.loss_weight(jnp.asarray(sigma), name)), ref, rtol=1e-6)


def test_text_dropout_zeroes_whole_segments_and_replaces_captions():
    b, length, d, p = 64, 6, 10, 8
    r = np.random.default_rng(1)
    ctx = r.standard_normal((b, length, d)).astype(np.float32) + 5  # no natural zeros
    pooled = r.standard_normal((b, p)).astype(np.float32) + 5
    layout = (Seg("clip_l", slice(0, 3), slice(0, 4), slice(0, 3)),
              Seg("clip_g", slice(0, 3), slice(4, 10), slice(3, 8)),
              Seg("t5", slice(3, 6), slice(0, 10), slice(0, 0)))
    null_ctx, null_pooled = np.full((length, d), -1.0, np.float32), np.full((p,), -2.0, np.float32)
    c, q = objective.drop_text(jax.random.PRNGKey(0), ctx, pooled, layout, null_ctx, null_pooled, 0.5, 0.25)
    c, q = np.asarray(c), np.asarray(q)
    captions = np.all(c == -1.0, axis=(1, 2))
    assert np.all(q[captions] == -2.0) and 4 <= captions.sum() <= 28
    dropped = np.zeros((len(layout), b), bool)
    for i in np.flatnonzero(~captions):
        for j, seg in enumerate(layout):
            region, pregion = c[i, seg.rows, seg.channels], q[i, seg.pooled]
            if np.all(region == 0):
                assert np.all(pregion == 0)
                dropped[j, i] = True
            else:  # kept segments are untouched
                np.testing.assert_array_equal(region, ctx[i, seg.rows, seg.channels])
                np.testing.assert_array_equal(pregion, pooled[i, seg.pooled])
    frac = dropped[:, ~captions].mean(1)
    assert np.all((frac > 0.25) & (frac < 0.75)), frac  # each encoder independently, p = 0.5
    assert len({tuple(col) for col in dropped[:, ~captions].T}) >= 6  # independent, not all-or-none
    # p = 0 leaves the text alone
    c0, q0 = objective.drop_text(jax.random.PRNGKey(0), ctx, pooled, layout, null_ctx, null_pooled, 0.0, 0.0)
    np.testing.assert_array_equal(np.asarray(c0), ctx)
    np.testing.assert_array_equal(np.asarray(q0), pooled)
