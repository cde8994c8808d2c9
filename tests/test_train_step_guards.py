"""The step's guards: a non-finite gradient is skipped (weights, optimizer state and EMA untouched) and
counted in the metrics and the progress line; the logged grad_norm is the trainable leaves' norm, the
one clipping sees (SD3's frozen position table has a gradient but is never updated)."""
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mmdit_jax as mj
import train_fake
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training import register_data_factory
from mmdit_jax.training.config import CheckpointConfig, LogConfig
from mmdit_jax.training.metrics import read_jsonl
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import make_train_step

NAN_AT = 2  # the third batch of the NaN stream


class NaNAt(train_fake.FakeTrainData):
    def __next__(self):
        i = self.index
        batch = super().__next__()
        if i == NAN_AT:
            batch["latents"][0, 0, 0, 0] = np.nan
        return batch


register_data_factory("fake_nan", lambda data_cfg, *, batch_size, seed, process_index, **kw:
                      NaNAt(batch_size, seed, process_index))


@pytest.fixture(scope="module")
def tiny():
    cfg = train_fake.tiny_config(batch_size=2)
    model = mj.Transformer(mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), None)
    data = train_fake.FakeTrainData(2, 0)
    return cfg, model, data


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_nan_batch_leaves_weights_optimizer_and_ema_unchanged(tiny):
    cfg, model, data = tiny
    tx = make_optimizer(cfg.optim, cfg.max_steps, model.trainable_mask())
    state, _ = create_state(model, tx, make_mesh({"fsdp": -1}), 0, use_ema=True)
    step = jax.jit(make_train_step(model, tx, cfg, data.text_layout))
    good = next(data)
    state, m = step(state, good)  # a real update first, so the moments and EMA are not at their init
    assert int(m["skipped"]) == 0
    bad = dict(good, latents=good["latents"].copy())
    bad["latents"][1, 2, 1, 3] = np.nan
    after, m = step(state, bad)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["grad_norm"]))
    _same(after.params, state.params)
    _same(after.opt_state, state.opt_state)
    _same(after.ema, state.ema)
    assert int(after.step) == int(state.step) + 1  # the step counts: its batch is spent
    again, m = step(after, good)  # and training goes on from the untouched state
    assert int(m["skipped"]) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(again.params))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(after.params)))


def _capture_grads():
    """An optimizer that applies nothing and keeps the last gradient as its state, where clipping sits."""
    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), grads
    return optax.GradientTransformation(init, update)


def test_logged_grad_norm_is_the_trainable_leaves_norm(tiny):
    cfg, model, data = tiny
    mask = model.trainable_mask()
    assert not all(jax.tree.leaves(mask))  # SD3's position table is a buffer
    tx = _capture_grads()
    state, _ = create_state(model, tx, make_mesh({"fsdp": -1}), 0, use_ema=False)
    # non-zero output layers, so the gradient reaches the position table
    state = state._replace(params=jax.tree.map(lambda x: x + 0.02 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                                               state.params))
    new, m = jax.jit(make_train_step(model, tx, cfg, data.text_layout))(state, next(data))
    grads = new.opt_state
    trainable = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if t]
    frozen = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if not t]
    assert float(optax.global_norm(frozen)) > 1e-3 * float(optax.global_norm(trainable))  # the test has power
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.global_norm(trainable)), rtol=1e-6)


def test_the_loop_counts_skipped_updates(tmp_path):
    from mmdit_jax.training.loop import train

    cfg = train_fake.tiny_config(data_factory="fake_nan", max_steps=5, log=LogConfig(every=1, val_every=0),
                                 checkpoint=CheckpointConfig(every=100, keep=1, async_save=False))
    out = io.StringIO()
    assert train(cfg, str(tmp_path / "run"), out=out) == 0
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert len(lines) == 5
    for i, line in enumerate(lines):
        assert f"skipped {int(i >= NAN_AT)}  " in line, line
    records = [r for r in read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl")) if "loss" in r]
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0]
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != NAN_AT)
    ema = mj.load_transformer(str(tmp_path / "run"), "float32").params  # the EMA written at the end
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ema))
