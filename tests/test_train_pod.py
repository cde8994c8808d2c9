"""What a pod run needs of the trainer, checked on CPU: gradient accumulation keeps every data-parallel
device on its own rows (8 virtual devices: no all-gather, about half the temporaries), a distillation
teacher given by its own path is read into its shardings, and the loop touches the host only on steps
that log or save (a device-to-host transfer guard around the others)."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import train_fake
from mmdit_jax.training import register_data_factory
from mmdit_jax.training.config import CheckpointConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import dataclasses, sys, jax, jax.numpy as jnp, numpy as np
    import mmdit_jax as mj, train_fake
    from mmdit_jax.sharding import make_mesh
    from mmdit_jax.training.config import DistillConfig
    from mmdit_jax.training.loop import load_teacher
    from mmdit_jax.training.optim import make_optimizer
    from mmdit_jax.training.state import create_state
    from mmdit_jax.training.step import batch_sharding, jit_train_step
    assert len(jax.devices()) == 8
    model = mj.Transformer(mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), None)

    # accumulation on a pure data mesh: each microbatch stays spread over all 8 devices
    mesh = make_mesh({"data": 8})
    B = 256  # enough rows that activations, not the tiny weights, make up the temporaries
    data = train_fake.FakeTrainData(B, 0)
    batch = jax.device_put(next(data), batch_sharding(mesh))
    layout, null = data.text_layout, tuple(map(jnp.asarray, data.null_text))
    temp = {}
    for accum in (1, 2):
        cfg = train_fake.tiny_config(batch_size=B)
        cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, grad_accum=accum))
        tx = make_optimizer(cfg.optim, 10, model.trainable_mask())
        state, sh = create_state(model, tx, mesh, 0, True)
        step = jit_train_step(model, tx, cfg, mesh, sh, layout, null).lower(state, batch).compile()
        hlo = step.as_text()
        assert "all-reduce" in hlo and "all-gather" not in hlo, (accum, hlo.count("all-gather"))
        temp[accum] = step.memory_analysis().temp_size_in_bytes
    print("TEMP", temp, temp[2] / temp[1])
    assert temp[2] < 0.7 * temp[1], temp

    # a teacher of its own: read into its (fsdp 8) shardings in its frozen dtype
    mj.save_transformer(mj.Transformer.init(model.config), sys.argv[1])
    mesh = make_mesh({"fsdp": 8})
    cfg = train_fake.tiny_config().replace(distill=DistillConfig(enabled=True, teacher=sys.argv[1],
                                                                 teacher_dtype="bfloat16"))
    teacher = load_teacher(cfg, mesh)
    want = model.param_shardings(mesh)
    for x, s in zip(jax.tree.leaves(teacher.params), jax.tree.leaves(want)):
        assert x.dtype == jnp.bfloat16 and x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    per_device = {}
    for x in jax.tree.leaves(teacher.params):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    total = sum(x.nbytes for x in jax.tree.leaves(teacher.params))
    print("TEACHER", total, sorted(per_device.values()))
    assert len(per_device) == 8 and max(per_device.values()) < total / 2, per_device
    print("OK")
""")


@pytest.mark.slow
def test_accumulation_stays_data_parallel_and_teacher_is_sharded(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "teacher")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    print(res.stdout)


class _GuardedData(train_fake.FakeTrainData):
    """Feeds the loop and, for the steps in `quiet`, forbids every device-to-host read (explicit ones
    too) from this batch until the next one is asked for: the whole of that step's iteration. JAX's
    transfer guard is what a GPU/TPU run trips; on CPU the arrays already live in host memory and it
    sees no transfer, so the test also checks jax.Array's host value and numpy's conversions."""

    quiet: frozenset = frozenset()
    guarded: list = []
    forbidden = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._guard = None

    def release(self):
        if self._guard is not None:
            self._guard.__exit__(None, None, None)
            self._guard = None
        type(self).forbidden = False

    def __next__(self):
        self.release()
        batch = super().__next__()
        if self.index in self.quiet:  # self.index: the step this batch feeds
            self._guard = jax.transfer_guard_device_to_host("disallow_explicit")
            self._guard.__enter__()
            type(self).forbidden = True
            type(self).guarded.append(self.index)
        return batch


def _guarded_factory(data_cfg, *, batch_size, seed, process_index, **kw):
    data = _GuardedData(batch_size, seed, process_index)
    _guarded_factory.made.append(data)
    return data


_guarded_factory.made = []
register_data_factory("fake_guarded", _guarded_factory)


def test_steps_that_neither_log_nor_save_never_touch_the_host(tmp_path, monkeypatch):
    from jax._src.array import ArrayImpl

    from mmdit_jax.training.loop import train

    def forbid(what):
        assert not _GuardedData.forbidden, f"{what} on a step that neither logs nor saves"

    host_value = ArrayImpl._value

    def checked(self):
        forbid(f"host value of a {self.shape} array")
        return host_value.fget(self)

    def checked_numpy(fn):
        def convert(x, *a, **kw):
            if isinstance(x, jax.Array):
                forbid(f"numpy.{fn.__name__} of a {x.shape} array")
            return fn(x, *a, **kw)
        return convert

    monkeypatch.setattr(ArrayImpl, "_value", property(checked))
    for name in ("asarray", "array"):
        monkeypatch.setattr(np, name, checked_numpy(getattr(np, name)))
    cfg = train_fake.tiny_config(data_factory="fake_guarded", max_steps=8)
    cfg = cfg.replace(log=dataclasses.replace(cfg.log, every=4, val_every=0),
                      checkpoint=CheckpointConfig(every=4, keep=3, async_save=True))
    # saves: the first step (a fresh run), 4 and 8; logs: 4 and 8
    _GuardedData.quiet, _GuardedData.guarded = frozenset({2, 3, 5, 6, 7}), []
    try:
        with open(os.devnull, "w") as out:
            assert train(cfg, str(tmp_path / "w"), out=out) == 0
    finally:
        for data in _guarded_factory.made:
            data.release()
    assert _GuardedData.guarded == [2, 3, 5, 6, 7]
