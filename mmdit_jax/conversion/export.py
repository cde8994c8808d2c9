"""Converted (or trained, or any other source) folder -> safetensors in diffusers or original layout.

`to="diffusers"`: a pipeline folder (or one component folder) that diffusers' / transformers'
`from_pretrained` load: config.json + `diffusion_pytorch_model.safetensors` (`model.safetensors` for
text encoders), sharded with an index past `max_shard_bytes` as diffusers does.
`to="original"`: single files as the reference repos ship them: SD3 / SD3.5 as one SAI file (network
under `model.diffusion_model.`, VAE under `first_stage_model.`), FLUX as a BFL transformer file plus
`ae.safetensors`. Text encoders are written in the diffusers export only.

Parameters stream one at a time from the source (Orbax partial restores or memmapped tensors) into
files whose headers are written first, so memory holds one parameter, never the model. Everything is
written under `OUT.partial` and renamed at the end.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from mmdit_jax.conversion.discover import Found, Job, discover
from mmdit_jax.conversion.pipelines import model_index
from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_named, family_of_config
from mmdit_jax.io import orbax_io, paths, rules
from mmdit_jax.io.files import atomic_folder, copy_tree, write_json
from mmdit_jax.io.safetensors_io import SafetensorsWriter
from mmdit_jax.progress import Progress, conversion

MAX_SHARD_BYTES = 10 * 10**9  # diffusers' default max_shard_size ("10GB")
FORMAT = {"format": "pt"}  # transformers refuses safetensors files without it


def plan_of(job: Job):
    """The key plan and patch size of a component (from its config, whatever its source form)."""
    cfg = job.weights.config
    if job.kind == "transformer":
        return family_of_config(cfg).plan(cfg), getattr(cfg, "patch_size", None)
    if job.kind == "vae":
        from mmdit_jax.vae.weights import plan

        return plan(cfg), None
    from mmdit_jax.text.weights import clip_plan, t5_plan

    return (clip_plan(cfg) if job.kind == "clip" else t5_plan(cfg)), None


def _keep_saved_dtypes(job: Job) -> None:
    """Export what an Orbax component holds at the dtypes it was saved in."""
    w = job.weights
    if not w.orbax:
        return
    saved = {tuple(str(k) for k in p): d for p, (_, d) in orbax_io.saved_leaves(w.origin).items()}

    def leaf(path, t):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        return jax.ShapeDtypeStruct(t.shape, saved.get(key, t.dtype))

    w.template = jax.tree_util.tree_map_with_path(leaf, w.template)


class _Files:
    """Tensors spread over one or several SafetensorsWriters by a key -> file map."""

    def __init__(self, folder: str, files: dict[str, list], where: dict[str, str]):
        self.where = where
        self.writers = {}
        try:
            for name, specs in files.items():
                self.writers[name] = SafetensorsWriter(os.path.join(folder, name), specs, FORMAT)
        except BaseException:
            self.abort()
            raise

    def write(self, key, arr):
        self.writers[self.where[key]].write(key, arr)

    def close(self):
        for w in self.writers.values():
            w.close()

    def abort(self):
        for w in self.writers.values():
            w.abort()


def _specs(job: Job, layout: str, prefix: str = ""):
    """[(entry, [(key, shape, dtype)])] in plan order, keys with `prefix`."""
    plan, patch = plan_of(job)
    flat = dict(job.weights.leaves())
    out = []
    for entry in plan:
        t = flat[entry.path]
        specs = rules.export_specs(entry, t.shape, layout, patch)
        out.append((entry, [(prefix + k, s, t.dtype) for k, s in specs]))
    return out, patch


def _stream(job: Job, layout: str, files: _Files, progress: Progress, prefix: str = "") -> None:
    plan, patch = plan_of(job)
    by_path = {e.path: e for e in plan}
    count = len(plan)
    for i, (path, arr) in enumerate(job.weights.stream(), 1):
        for key, t in rules.export_entry(by_path[tuple(path)], arr, layout, patch):
            files.write(prefix + key, t)
        progress.update(arr.nbytes, component=job.name, index=i, count=count)
        del arr
    progress.update(0, force=True, component=job.name, index=count, count=count)


def _shards(specs, stem: str, max_bytes: int):
    """{file: [specs]}, {key: file} and the index (None for one file), whole entries per shard."""
    groups, cur, size = [], [], 0
    for _, entry_specs in specs:
        n = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in entry_specs)
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur += entry_specs
        size += n
    groups.append(cur)
    if len(groups) == 1:
        name = f"{stem}.safetensors"
        return {name: groups[0]}, {k: name for k, _, _ in groups[0]}, None
    files, where, total = {}, {}, 0
    for i, g in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        files[name] = g
        for k, s, d in g:
            where[k] = name
            total += int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
    return files, where, {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}


def _write_diffusers(job: Job, folder: str, progress: Progress, max_shard_bytes: int) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), job.config_json, sort_keys=True)
    specs, _ = _specs(job, job.layout)
    stem = "model" if job.kind in ("clip", "t5") else "diffusion_pytorch_model"
    files, where, index = _shards(specs, stem, max_shard_bytes)
    out = _Files(folder, files, where)
    try:
        _stream(job, job.layout, out, progress)
        out.close()
    except BaseException:
        out.abort()
        raise
    if index is not None:
        write_json(os.path.join(folder, f"{stem}.safetensors.index.json"), index)


def _write_original(found: Found, folder: str, progress: Progress) -> list[str]:
    """The reference repos' single files; returns the file names written."""
    jobs = {j.name: j for j in found.models}
    written = []
    tr, vae = jobs.get("transformer"), jobs.get("vae")
    files = family_named(found.family).original if found.family is not None else None
    # (file, [(job, key prefix)])
    if tr is not None and files.vae_prefix_in_transformer_file is not None:
        groups = [(files.transformer_file, [(tr, files.transformer_prefix)]
                   + ([(vae, files.vae_prefix_in_transformer_file)] if vae else []))]
    else:
        groups = []
        if tr is not None:
            groups.append((files.transformer_file, [(tr, files.transformer_prefix)]))
        if vae is not None:
            groups.append((files.vae_file if files is not None else "vae.safetensors", [(vae, "")]))
    if not groups:
        raise MMDiTError(f"{found.origin}: no transformer or VAE to write in the original layout (text "
                         "encoders are exported with --to=diffusers)")
    for name, members in groups:
        specs = []
        for job, prefix in members:
            specs += [s for _, entry_specs in _specs(job, "original", prefix)[0] for s in entry_specs]
        out = _Files(folder, {name: specs}, {k: name for k, _, _ in specs})
        try:
            for job, prefix in members:
                _stream(job, "original", out, progress, prefix)
            out.close()
        except BaseException:
            out.abort()
            raise
        written.append(name)
    return written


def export(src, out, to: str = "diffusers", dtype: str | None = None, *, tokenizers: str | None = None,
           max_shard_bytes: int = MAX_SHARD_BYTES, progress: Progress | None = None) -> dict:
    """Write `src` (a folder written by mmdit-convert, a training workdir, or any other source form) to
    `out` in `to` layout. `dtype` None keeps the saved dtypes of Orbax components (float32 for other
    sources)."""
    if to not in ("diffusers", "original"):
        raise MMDiTError(f"--to={to!r}: expected 'diffusers' or 'original'")
    out = paths.absolute(out)
    paths.check_bucket(out, "--out")
    if paths.exists(out):
        raise MMDiTError(f"{out}: already exists; not overwriting")
    found = discover(src, dtype or "float32", tokenizers)
    if not found.models:
        raise MMDiTError(f"{src}: holds no model component to export")
    for job in found.models:
        if dtype is None:
            _keep_saved_dtypes(job)
        job.weights.check()
    total = sum(sum(int(t.size) * t.dtype.itemsize for _, t in j.weights.leaves()) for j in found.models)
    progress = progress or conversion(total)
    progress.total = max(total, 1)
    with atomic_folder(out) as tmp:
        if to == "original":
            files = _write_original(found, tmp, progress)
        else:
            files = []
            single = found.pipeline is None
            for job in found.jobs:
                folder = tmp if single else os.path.join(tmp, job.name)
                if job.kind == "files":
                    if job.copy_from is not None:
                        copy_tree(job.copy_from, folder)
                    else:
                        os.makedirs(folder, exist_ok=True)
                        for name, obj in job.files.items():
                            write_json(os.path.join(folder, name), obj)
                    continue
                _write_diffusers(job, folder, progress, max_shard_bytes)
                files.append(job.name)
            if not single:
                write_json(os.path.join(tmp, "model_index.json"),
                           model_index(found.pipeline, {j.name: j.cls for j in found.jobs}))
    return {"out": out, "to": to, "written": files, "source": found.origin, "notes": _notes(found, to)}


def _notes(found, to: str) -> list[str]:
    """What the written files hold that the reference code will not read."""
    notes = []
    for job in found.models:
        cfg = job.weights.config
        note = family_of_config(cfg).distilled_export_note if job.kind == "transformer" else None
        if note is not None and getattr(cfg, "guidance_embed", False):
            notes.append(note(job.name, to))
    return notes
