"""mmdit-train end to end on a tiny SD3 network and synthetic encoded batches: a tiny batch is overfit,
a SIGTERM'd (then SIGINT'd) run resumes to exactly the losses and weights of an uninterrupted one, the
workdir loads as a pipeline with the EMA weights, and bad settings fail before any work with one line."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mmdit_jax as mj
import train_fake
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.config import LossConfig, OptimConfig
from mmdit_jax.training.metrics import read_jsonl
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "train_fake_config.py")


def test_tiny_model_overfits_a_tiny_batch():
    cfg = train_fake.tiny_config(optim=OptimConfig(lr=1e-2, clip_norm=0.0, weight_decay=0.0),
                                 loss=LossConfig(encoder_dropout=0.0), batch_size=2)
    model = mj.Transformer(mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), None)
    tx = make_optimizer(cfg.optim, 200, model.trainable_mask())
    state, _ = create_state(model, tx, make_mesh({"fsdp": -1}), 0, use_ema=False)
    batch = next(train_fake.FakeTrainData(2, 0))
    step = jax.jit(make_train_step(model, tx, cfg))
    key = state.rng
    losses = []
    for _ in range(150):
        state, m = step(state._replace(rng=key), batch)  # the same (t, noise) pairs every step
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def _cli(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"), JAX_PLATFORMS="cpu",
               # the four runs compile the same programs: compile once
               JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return [sys.executable, os.path.join(ROOT, "train", "train.py"), f"--workdir={workdir}",
            f"--config={CONFIG}", *extra], env


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _vals(workdir):
    return [(r["step"], r["val_loss"], r["val_loss_ema"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "val_loss" in r]


def _tensorboard_scalars(workdir):
    """{tag: [(step, value)]} read back from the TFRecord event files (framing, then the Event proto)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    folder = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(folder)):
        raw = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_exactly(tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    cmd, env = _cli(ref)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ETA" in res.stdout and "step 12/12" in res.stdout

    cmd, env = _cli(killed)
    metrics = os.path.join(killed, "metrics.jsonl")

    def interrupt(sig, after):
        """Run until `after` losses are logged, send `sig`: the step it saved at."""
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 500
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(_losses(killed)) >= after:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 143, (sig, err[-3000:])
        assert "preempted: saved step" in out
        return int(out.split("preempted: saved step ")[1].split(";")[0]), out

    stopped, _ = interrupt(signal.SIGTERM, 4)
    assert 4 <= stopped < 12
    # Ctrl-C too: the resumed run saves and exits the same way
    stopped_again, out = interrupt(signal.SIGINT, stopped + 2)
    assert f"resumed from step {stopped}" in out and stopped + 2 <= stopped_again < 12
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {stopped_again}" in res.stdout

    # identical loss sequences (bitwise: CPU float32, same programs, same data and keys)
    assert _losses(killed) == _losses(ref) and len(_losses(ref)) == 12
    assert _vals(killed) == _vals(ref) and [v[0] for v in _vals(ref)] == [4, 8, 12]
    # the workdir is a pipeline folder whose transformer is the trained EMA
    a, b = mj.load_transformer(ref), mj.load_transformer(killed)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    mngr = ocp.CheckpointManager(os.path.join(ref, "checkpoints"))
    assert mngr.latest_step() == 12 and len(mngr.all_steps()) == 2  # keep = 2
    saved = mngr.restore(12, args=ocp.args.Composite(ema=ocp.args.StandardRestore(), params=ocp.args.StandardRestore()))
    for x, e, p in zip(jax.tree.leaves(a.params), jax.tree.leaves(saved["ema"]), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(e))
    assert any(float(np.abs(np.asarray(e) - np.asarray(p)).max()) > 0 for e, p in
               zip(jax.tree.leaves(saved["ema"]), jax.tree.leaves(saved["params"])))
    tb = _tensorboard_scalars(ref)
    assert {"loss", "grad_norm", "lr", "images_per_sec", "val_loss", "val_loss_ema"} <= set(tb)
    assert [(st, pytest.approx(v, rel=1e-6)) for st, v in tb["loss"]] == _losses(ref)
    index = json.load(open(os.path.join(ref, "model_index.json")))
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    # trained weights, not the init: the output layer (zero at init) moved
    assert float(np.abs(np.asarray(a.params["final_layer"]["linear"]["kernel"])).max()) > 0

    # rerunning a finished run changes nothing
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and _losses(killed) == _losses(ref)


@pytest.mark.parametrize("args, words", [
    ((), "--workdir is required"),
    (("--workdir=W", "--set=optim.lr=-1"), "optim.lr"),
    (("--workdir=W", "--set=optim.nope=1"), "unknown field 'nope'"),
    (("--workdir=W", "--remat=some"), "model.remat"),
    (("--workdir=W", "--max_steps=abc"), "max_steps"),
    (("--workdir=W", "--set=optim.grad_accum=3"), "must divide batch_size"),
])
def test_bad_settings_fail_before_work_with_one_line(tmp_path, args, words):
    args = tuple(a.replace("=W", f"={tmp_path / 'w'}") for a in args)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "train", "train.py"), *args]
    if not any(a.startswith("--config") for a in args):
        cmd.append(f"--config={CONFIG}")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert words in res.stderr
    assert not os.path.exists(tmp_path / "w")  # rejected before any work
