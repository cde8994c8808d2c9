"""Optimizer, EMA and gradient accumulation against hand computations."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mmdit_jax as mj
from mmdit_jax.training.config import EMAConfig, OptimConfig
from mmdit_jax.training.optim import ema_update, learning_rate, make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import make_train_step
from mmdit_jax.sharding import make_mesh
import train_fake


def test_adamw_clipping_warmup_and_frozen_leaves_by_hand():
    cfg = OptimConfig(lr=0.1, b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.05, warmup_steps=2, clip_norm=0.5,
                      schedule="constant")
    params = {"a": jnp.array([1.0, -2.0, 3.0]), "buf": jnp.array([5.0, 6.0])}
    tx = make_optimizer(cfg, 10, {"a": True, "buf": False})
    state = tx.init(params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = np.zeros(3)
    v = np.zeros(3)
    r = np.random.default_rng(0)
    for t in range(4):
        g = {"a": r.standard_normal(3) * 3, "buf": r.standard_normal(2)}
        upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, upd)
        # by hand: clip the trainable gradients' global norm, Adam moments, bias correction, decoupled decay
        ga = g["a"] * min(1.0, 0.5 / np.linalg.norm(g["a"]))
        m = 0.8 * m + 0.2 * ga
        v = 0.9 * v + 0.1 * ga ** 2
        mh, vh = m / (1 - 0.8 ** (t + 1)), v / (1 - 0.9 ** (t + 1))
        lr = 0.1 * min(t / 2, 1.0)  # linear warmup from 0 over 2 steps, then constant
        p["a"] = p["a"] - lr * (mh / (np.sqrt(vh) + 1e-6) + 0.05 * p["a"])
        np.testing.assert_allclose(np.asarray(params["a"]), p["a"], rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(params["buf"]), [5.0, 6.0])


def test_schedules():
    cos = learning_rate(OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14)
    assert float(cos(0)) == 0.0 and float(cos(2)) == 0.5 and float(cos(4)) == 1.0
    assert abs(float(cos(9)) - (0.1 + 0.9 * 0.5)) < 1e-6 and abs(float(cos(14)) - 0.1) < 1e-6
    const = learning_rate(OptimConfig(lr=2.0, schedule="constant"), 100)
    assert float(const(0)) == 2.0 and float(const(99)) == 2.0


def test_ema_by_hand():
    cfg = EMAConfig(decay=0.5, warmup=True)
    ema = {"w": jnp.array([0.0, 4.0])}
    ref = np.array([0.0, 4.0])
    for step, p in enumerate([np.array([1.0, 1.0]), np.array([2.0, -1.0]), np.array([3.0, 0.0])]):
        ema = ema_update(ema, {"w": jnp.asarray(p)}, step, cfg)
        d = min(0.5, (1 + step) / (10 + step))
        ref = d * ref + (1 - d) * p
        np.testing.assert_allclose(np.asarray(ema["w"]), ref, rtol=1e-6)
    plain = ema_update({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, 0, EMAConfig(decay=0.75, warmup=False))
    np.testing.assert_allclose(np.asarray(plain["w"]), [1.5])


def _step_once(cfg, batch):
    model = mj.Transformer(mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), None)
    tx = make_optimizer(cfg.optim, cfg.max_steps, model.trainable_mask())
    state, _ = create_state(model, tx, make_mesh({"fsdp": -1}), cfg.seed, cfg.ema.decay > 0)
    # non-zero output layers so every parameter gets a gradient
    state = state._replace(params=jax.tree.map(lambda x: x + 0.02 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                                               state.params))
    state = state._replace(ema=state.params)
    data = train_fake.FakeTrainData(cfg.batch_size, 0)
    step = jax.jit(make_train_step(model, tx, cfg, data.text_layout, tuple(map(jnp.asarray, data.null_text))))
    return step(state, batch), state


@pytest.mark.slow
def test_accumulation_matches_one_big_batch_and_ema_follows():
    base = train_fake.tiny_config(batch_size=6)
    # Adam's first step is ~lr * sign(g): a large eps keeps it a smooth function of the gradient, so
    # rounding differences between the two summation orders stay at rounding level
    base = base.replace(optim=dataclasses.replace(base.optim, warmup_steps=0, eps=1e-3))
    batch = next(train_fake.FakeTrainData(6, 0))
    (one, m1), start = _step_once(base, batch)
    (acc, m3), _ = _step_once(base.replace(optim=dataclasses.replace(base.optim, grad_accum=3)),
                              batch)
    assert abs(float(m1["loss"]) - float(m3["loss"])) < 1e-6 * float(m1["loss"])
    assert abs(float(m1["grad_norm"]) - float(m3["grad_norm"])) < 1e-5 * float(m1["grad_norm"])
    assert float(m1["grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    moved = sum(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params),
                                                             jax.tree.leaves(start.params)))
    assert moved > 0
    # EMA after the first update: decay_0 = min(0.9, 1/10) = 0.1
    for e, p, p0 in zip(jax.tree.leaves(one.ema), jax.tree.leaves(one.params), jax.tree.leaves(start.params)):
        np.testing.assert_allclose(np.asarray(e), 0.1 * np.asarray(p0) + 0.9 * np.asarray(p), rtol=1e-5, atol=1e-7)
    assert int(one.step) == 1
