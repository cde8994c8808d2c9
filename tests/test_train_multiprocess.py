"""Two `mmdit-train` processes on localhost (4 CPU devices each, gloo collectives, one (data 2, fsdp 4)
mesh across both) train and checkpoint; a rerun resumed from the middle checkpoint ends with the same
weights and losses as the uninterrupted run, and each checkpoint keeps both processes' data streams."""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import mmdit_jax as mj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "train_mp_config.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(workdir):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-m", "mmdit_jax.cli.train", f"--workdir={workdir}",
                               f"--config={CONFIG}", "--mesh_data=2", "--mesh_fsdp=-1", "--distributed",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    return outs


def _meta(workdir, step):
    (path,) = glob.glob(os.path.join(workdir, "checkpoints", str(step), "meta", "*metadata*"))
    with open(path) as f:
        return json.load(f)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    out = _train(full)
    assert "step 6/6" in out[0] and "step 6/6" not in out[1]  # only process 0 reports
    meta = _meta(full, 6)
    assert meta["process_count"] == 2
    # each process's own stream position (FakeTrainData refuses another process's state on restore)
    assert meta["data"] == {"0": {"index": 6, "process": 0}, "1": {"index": 6, "process": 1}}, meta["data"]
    assert meta["data_start"] == {"0": {"index": 0, "process": 0}, "1": {"index": 0, "process": 1}}

    # the rerun finds step 3 as the newest checkpoint and continues from it
    shutil.copytree(full, resumed, symlinks=True)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    out = _train(resumed)
    assert "resumed from step 3" in out[0] and "resumed from step 3" in out[1]
    assert _meta(resumed, 6)["data"] == meta["data"]
    a, b = _losses(full), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-6)
    pa, pb = mj.load_transformer(full).params, mj.load_transformer(resumed).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


def test_distributed_settings_are_checked_before_joining(monkeypatch):
    from mmdit_jax.errors import MMDiTError
    from mmdit_jax.training import distributed

    with pytest.raises(MMDiTError, match="--process_id=2 must lie in"):
        distributed.initialize("localhost:1", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(MMDiTError, match="JAX_NUM_PROCESSES"):
        distributed.initialize("localhost:1", None, 0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(MMDiTError, match="--process_id=5 must lie in"):
        distributed.initialize()


def test_checkpoint_data_state_must_match_the_process_count():
    from mmdit_jax.errors import MMDiTError
    from mmdit_jax.training.distributed import own, per_process

    assert per_process({"index": 3}) == {"0": {"index": 3}} and own({"0": {"index": 3}}, "data") == {"index": 3}
    with pytest.raises(MMDiTError, match="written by 2 processes, this run has 1"):
        own({"0": {}, "1": {}}, "data")
