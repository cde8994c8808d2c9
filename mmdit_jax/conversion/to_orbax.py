"""PyTorch checkpoints -> a pipeline-shaped folder of Orbax components (what `mmdit-convert` writes).

Every model component becomes `NAME/config.json` + `NAME/params/` (the params pytree as the library
object holds it, stacked blocks included), written one array at a time: tensors are read through
memmaps, one parameter (e.g. all blocks' kernels of one kind) is built, handed to Orbax and dropped.
Tokenizer and scheduler folders are copied. The folder appears only once complete (`OUT.partial`
until then, removed on failure); nothing is written before every component was checked.
"""
from __future__ import annotations

import os
import time

from mmdit_jax.conversion.discover import Found, Job, discover
from mmdit_jax.conversion.pipelines import model_index
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.io.files import atomic_folder, copy_tree, write_json
from mmdit_jax.io.orbax_io import ParamsWriter
from mmdit_jax.progress import Progress, conversion

RECORD = "mmdit_convert.json"


def _nbytes(job: Job) -> int:
    return sum(int(t.size) * t.dtype.itemsize for _, t in job.weights.leaves())


def _write_json(path: str, obj) -> None:
    write_json(path, obj, sort_keys=True)


def _write_model(job: Job, folder: str, progress: Progress) -> int:
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), job.config_json)
    writer = ParamsWriter(folder)
    count, i = len(job.weights.leaves()), 0
    try:
        for i, (_, arr) in enumerate(job.weights.stream(), 1):
            # one parameter at a time: handed to the writer, then dropped here
            writer.add(_, arr)
            progress.update(arr.nbytes, component=job.name, index=i, count=count)
            del arr
        writer.close()
    except BaseException:
        writer.abort()
        raise
    progress.update(0, force=True, component=job.name, index=i, count=count)
    return count


def _write_files(job: Job, folder: str) -> None:
    if job.copy_from is not None:
        copy_tree(job.copy_from, folder)
    else:
        os.makedirs(folder, exist_ok=True)
        for name, obj in job.files.items():
            _write_json(os.path.join(folder, name), obj)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("mmdit_jax", "jax", "flax", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    import mmdit_jax

    out["mmdit_jax"] = mmdit_jax.__version__
    return out


def write_orbax(found: Found, out: str, dtype: str, progress: Progress | None = None) -> dict:
    """Write what `discover` found into `out` (must not exist). Returns the record also saved as
    mmdit_convert.json."""
    out = paths.absolute(out)
    paths.check_bucket(out, "--out")
    if paths.exists(out):
        raise MMDiTError(f"{out}: already exists; not overwriting")
    for job in found.models:
        job.weights.check()  # names and shapes only: a bad source fails before anything is written
    total = sum(_nbytes(j) for j in found.models)
    progress = progress or conversion(total)
    progress.total = max(total, 1)
    start = time.monotonic()
    record = {"source": paths.absolute(found.origin), "dtype": dtype, "versions": _versions(),
              "pipeline": found.pipeline, "components": {}, "notes": found.notes}
    with atomic_folder(out) as tmp:
        single = found.pipeline is None
        for job in found.jobs:
            folder = tmp if single else os.path.join(tmp, job.name)
            if job.kind == "files":
                _write_files(job, folder)
                record["components"][job.name] = {"copied_from": job.copy_from} if job.copy_from \
                    else {"written": sorted(job.files)}
                continue
            progress.say(f"[{job.name}] {job.weights.origin} -> {len(job.weights.leaves())} arrays, "
                         f"{_nbytes(job) / 2**30:.2f} GB at {dtype}")
            n = _write_model(job, folder, progress)
            record["components"][job.name] = {"origin": job.weights.origin, "kind": job.kind,
                                              "layout": job.weights.layout or "orbax", "arrays": n,
                                              "bytes": _nbytes(job), "class": job.cls}
        if not single:
            _write_json(os.path.join(tmp, "model_index.json"),
                        model_index(found.pipeline, {j.name: j.cls for j in found.jobs}))
        record["seconds"] = round(time.monotonic() - start, 1)
        _write_json(os.path.join(tmp, RECORD), record)
    return record


def convert(src, out, dtype: str = "float32", tokenizers: str | None = None,
            progress: Progress | None = None) -> dict:
    """`src` (any source form) -> Orbax folder `out` at `dtype` ("float32" / "bfloat16")."""
    from mmdit_jax.dtypes import parse_dtype

    parse_dtype(dtype)
    paths.check_bucket(out, "--out")
    if paths.exists(out):  # before reading anything
        raise MMDiTError(f"{paths.absolute(out)}: already exists; not overwriting")
    found = discover(src, dtype, tokenizers)
    if not found.models:
        raise MMDiTError(f"{src}: holds no model component to convert")
    return write_orbax(found, out, dtype, progress)
