"""Multi-process runs on JAX's own runtime: joining the job, and sharing small host-side state.

Every process runs the same `mmdit-train` command; only the process id differs. On TPU pods, SLURM and
other clusters jax.distributed.initialize() finds the coordinator by itself; elsewhere it comes from the
flags or the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from mmdit_jax.errors import MMDiTError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize with flags first, then the environment, then JAX's auto-detection.

    CPU processes exchange collectives through gloo (the CPU client has no other cross-process
    transport); the setting only concerns the CPU backend, so it is harmless on TPU and GPU."""
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    try:
        if num_processes is None and os.environ.get(ENV["num_processes"]):
            num_processes = int(os.environ[ENV["num_processes"]])
        if process_id is None and os.environ.get(ENV["process_id"]):
            process_id = int(os.environ[ENV["process_id"]])
    except ValueError as e:
        raise MMDiTError(f"--distributed: {ENV['num_processes']} / {ENV['process_id']} must be integers "
                         f"({e})") from None
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise MMDiTError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        raise MMDiTError(f"--distributed: cannot join the job ({str(e).splitlines()[0][:200]}); set "
                         "--coordinator_address, --num_processes and --process_id (or the JAX_* "
                         "environment variables) unless the cluster is auto-detected") from None


def gather_json(obj) -> list:
    """`obj` (JSON-able) of every process, in process order; collective: every process must call it."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, :sizes[i]]).decode()) for i in range(len(sizes))]


def per_process(obj) -> dict:
    """{"0": obj of process 0, "1": ...}: what a checkpoint's meta stores for host-side state such as
    each process's data-iterator position."""
    return {str(i): x for i, x in enumerate(gather_json(obj))}


def own(saved: dict, what: str):
    """This process's entry of a `per_process` dict, checked against the number of processes."""
    n, me = jax.process_count(), jax.process_index()
    if len(saved) != n or str(me) not in saved:
        raise MMDiTError(f"checkpoint meta {what!r} was written by {len(saved)} processes, this run has {n}: "
                         "resume with the same number of processes (the data stream is split by process)")
    return saved[str(me)]


def barrier(name: str) -> None:
    """Every process waits here until all have come (e.g. for files the lead process writes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_group(batch_sharding, shards: int) -> tuple[int, int]:
    """(index, count) of this process's data group. A batch split by `batch_sharding` into `shards`
    pieces may be held whole by several processes (a tensor or sequence axis spanning processes):
    those are replicas and must feed identical rows, so a data stream is read per group, not per
    process. Groups are numbered by their lowest process index (index = process index when every
    process holds rows of its own)."""
    held: dict[int, set] = {}
    for device, index in batch_sharding.devices_indices_map((shards,)).items():
        held.setdefault(device.process_index, set()).add(index[0].start or 0)
    groups: list[frozenset] = []
    for p in sorted(held):
        rows = frozenset(held[p])
        if rows not in groups:
            if any(rows & g for g in groups) or (groups and len(rows) != len(groups[0])):
                raise MMDiTError("--mesh_*: processes hold overlapping but different parts of the batch; "
                                 "choose mesh sizes with which each process holds whole data-parallel shards")
            groups.append(rows)
    return groups.index(frozenset(held[jax.process_index()])), len(groups)
