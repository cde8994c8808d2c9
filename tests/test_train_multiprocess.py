"""Two `mmdit-train` processes on localhost (gloo collectives, one mesh across both), each run starting
from an empty workdir where the lead process writes the base the other one waits for:
- 4 CPU devices each, (data 2, fsdp 4): a SIGTERM sent to one process only stops both at the same step
  with one checkpoint (exit 143); the rerun resumes to exactly the losses and weights of an uninterrupted
  run, and each checkpoint keeps both processes' data streams;
- 2 CPU devices each, (tensor 4): both processes hold the whole batch, so both read the same stream, and
  the losses are those of one process holding all four devices."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

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


def _start(workdir, *flags, devices=4, processes=2):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    dist = ["--distributed", f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
    return [subprocess.Popen([sys.executable, "-m", "mmdit_jax.cli.train", f"--workdir={workdir}",
                              f"--config={CONFIG}", *flags,
                              *((dist + [f"--process_id={i}"]) if processes > 1 else [])],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


def _finish(procs, status=0, timeout=300):
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == status for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    return outs


def _meta(workdir, step):
    (path,) = glob.glob(os.path.join(workdir, "checkpoints", str(step), "meta", "*metadata*"))
    with open(path) as f:
        return json.load(f)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


DATA_PARALLEL = ("--mesh_data=2", "--mesh_fsdp=-1", "--max_steps=12", "--set=data_factory=fake_slow")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    out = _finish(_start(full, *DATA_PARALLEL))
    assert "step 12/12" in out[0] and "step 12/12" not in out[1]  # only process 0 reports
    meta = _meta(full, 12)
    assert meta["process_count"] == 2
    # each process's own stream position (FakeTrainData refuses another process's state on restore)
    assert meta["data"] == {"0": {"index": 12, "process": 0}, "1": {"index": 12, "process": 1}}, meta["data"]
    assert meta["data_start"] == {"0": {"index": 0, "process": 0}, "1": {"index": 0, "process": 1}}

    procs = _start(killed, *DATA_PARALLEL)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(os.path.join(killed, "metrics.jsonl")) and len(_losses(killed)) >= 3:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one process only: the other learns it from the first
    out = _finish(procs, status=143, timeout=120)
    stops = {int(o.split("preempted: saved step ")[1].split(";")[0]) for o in out}
    assert len(stops) == 1, out
    (stopped,) = stops
    assert 3 <= stopped < 12
    assert max(int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit()) == stopped
    assert _meta(killed, stopped)["data"] == {str(i): {"index": stopped, "process": i} for i in range(2)}

    out = _finish(_start(killed, *DATA_PARALLEL))
    assert all(f"resumed from step {stopped}" in o for o in out)
    assert _meta(killed, 12)["data"] == meta["data"]
    a, b = _losses(full), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-6)
    pa, pb = mj.load_transformer(full).params, mj.load_transformer(killed).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_processes_holding_the_same_rows_read_the_same_stream(tmp_path):
    flags = ("--mesh_tensor=4", "--mesh_fsdp=1", "--max_steps=2")
    _finish(_start(str(tmp_path / "two"), *flags, devices=2))
    # both processes hold all four rows of each batch: one data group, one stream (group 0's)
    assert _meta(str(tmp_path / "two"), 2)["data"] == {"0": {"index": 2, "process": 0},
                                                       "1": {"index": 2, "process": 0}}
    _finish(_start(str(tmp_path / "one"), *flags, devices=4, processes=1))
    a, b = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "two"))
    assert sorted(a) == sorted(b) == [1, 2]
    np.testing.assert_allclose([b[1], b[2]], [a[1], a[2]], rtol=1e-5)


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
