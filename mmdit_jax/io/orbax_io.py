"""Orbax components: the form `mmdit-convert` writes and the trainer's workdir exposes.

A component folder (transformer/, vae/, text_encoder*/) holds `config.json` (the diffusers config, as
for safetensors folders) and its parameters in one of two forms:
- `params/`: an Orbax checkpoint of the params pytree exactly as the library object holds it (stacked
  blocks included), so loading is a restore straight into the target shapes, dtype and sharding;
- `checkpoint.json`: {"directory": path relative to the component folder, "item": name} pointing at an
  Orbax CheckpointManager directory (the trainer's) whose steps are Composite checkpoints holding
  `item` as the same pytree; the newest step is restored unless "step" is given.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths

PARAMS_DIR = "params"
POINTER_FILE = "checkpoint.json"


def is_orbax_component(folder: str) -> bool:
    return paths.isdir(paths.resolve(paths.join(folder, PARAMS_DIR))) or \
        paths.isfile(paths.join(folder, POINTER_FILE))


def _params_dir(folder: str) -> str:
    """folder/params, or where its link pointer leads (a bucket's, left in place by paths.local_folder)."""
    return paths.absolute(paths.resolve(paths.join(folder, PARAMS_DIR)))


def save_params(folder: str, params) -> None:
    """Writes `params` under folder/params/ (Orbax commits atomically: a partial save is never valid)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(paths.absolute(paths.join(folder, PARAMS_DIR)), params)
    ckptr.wait_until_finished()


def _target(template, shardings):
    """ShapeDtypeStructs carrying the wanted dtype (Orbax casts on restore) and placement; without
    shardings, the default device (so leaves come back as jax.Arrays, not numpy)."""
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=one), template)
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), template, shardings)


def _check_tree(folder: str, saved_meta, template) -> None:
    def paths(tree):
        # lists come back from metadata as dicts keyed "0", "1", ...: compare plain names
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): getattr(v, "shape", None)
                for p, v in jax.tree_util.tree_leaves_with_path(tree)}

    want, have = paths(template), paths(saved_meta)
    missing = sorted(set(want) - set(have))
    if missing:
        raise MMDiTError(f"{folder}: checkpoint lacks {len(missing)} parameter(s) the config needs, "
                         f"e.g. {missing[0]}")
    for k, shape in want.items():
        if have[k] is not None and tuple(have[k]) != tuple(shape):
            raise MMDiTError(f"{folder}: parameter {k} has shape {tuple(have[k])} in the checkpoint, "
                             f"the config needs {tuple(shape)}{_merged_hint(have[k], shape)}")


def _merged_hint(have, want) -> str:
    """A hint when the saved shape is the wanted one with neighbouring axes merged: fused kernels
    (qkv, FLUX's linear1/linear2) written before they kept their parts on an axis of their own."""
    have, want = tuple(have), tuple(want)
    if have == want or int(np.prod(have)) != int(np.prod(want)):
        return ""
    i = 0
    for d in have:
        prod = 1
        while i < len(want) and prod < d:
            prod *= want[i]
            i += 1
        if prod != d:
            return ""
    if i != len(want):
        return ""
    return ("; this folder was written by an older mmdit-jax with fused kernels as plain matrices: convert "
            "it again from the safetensors source with mmdit-convert")


def check_saved(folder: str, template) -> None:
    """The saved params cover `template` with the same shapes (metadata only)."""
    path = params_path(folder)
    have = saved_leaves(folder)
    want = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): tuple(v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(template)}
    norm = lambda p: tuple(str(k) for k in p)  # noqa: E731 - saved int keys may come back as strings
    have = {norm(k): v[0] for k, v in have.items()}
    missing = sorted("/".join(norm(k)) for k in want if norm(k) not in have)
    if missing:
        raise MMDiTError(f"{path}: checkpoint lacks {len(missing)} parameter(s) the config needs, "
                         f"e.g. {missing[0]}")
    for k, shape in want.items():
        if tuple(have[norm(k)]) != shape:
            raise MMDiTError(f"{path}: parameter {'/'.join(norm(k))} has shape {have[norm(k)]} in the "
                             f"checkpoint, the config needs {shape}{_merged_hint(have[norm(k)], shape)}")


def restore_params(folder: str, template, shardings=None):
    """The params pytree of an Orbax component folder, restored into `template`'s shapes and dtypes
    (a pytree of ShapeDtypeStructs) and, when given, `shardings` (a matching pytree of Shardings)."""
    folder = paths.absolute(folder)
    target = _target(template, shardings)
    pointer = paths.join(folder, POINTER_FILE)
    if paths.isfile(pointer):
        return _restore_pointer(folder, pointer, target)
    path = _params_dir(folder)
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged checkpoint
        raise MMDiTError(f"{path}: not a readable Orbax checkpoint ({_first_line(e)})") from None
    if meta is None:
        raise MMDiTError(f"{path}: not a readable Orbax checkpoint (no metadata)")
    _check_tree(path, meta, template)
    try:
        return ckptr.restore(path, target)
    except Exception as e:  # noqa: BLE001 - shapes were checked, so this is damaged data
        raise MMDiTError(f"{path}: damaged Orbax checkpoint ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _read_pointer(folder: str, pointer: str) -> tuple[dict, str]:
    """A checkpoint.json's contents and the CheckpointManager directory it names."""
    try:
        spec = paths.read_json(pointer)
    except json.JSONDecodeError as e:
        raise MMDiTError(f"{pointer}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or "directory" not in spec or "item" not in spec:
        raise MMDiTError(f"{pointer}: needs \"directory\" and \"item\"")
    # relative to the component folder, or absolute (a URL: a bucket folder's local copy names it so)
    directory = str(spec["directory"])
    directory = directory if paths.is_remote(directory) else \
        paths.absolute(paths.normpath(paths.join(folder, directory)))
    if not paths.isdir(directory):
        raise MMDiTError(f"{pointer}: checkpoint directory {directory} does not exist")
    return spec, directory


def _restore_pointer(folder: str, pointer: str, target):
    spec, directory = _read_pointer(folder, pointer)
    mngr = ocp.CheckpointManager(directory)
    step = spec.get("step")
    step = mngr.latest_step() if step is None else int(step)
    if step is None:
        raise MMDiTError(f"{directory}: no finished checkpoint yet")
    item = str(spec["item"])
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise MMDiTError(f"{directory}: step {step} has no usable item {item!r} ({_first_line(e)})") from None
    finally:
        mngr.close()
    return out[item]


# Arrays are buffered up to this many bytes between partial saves (a larger array goes alone).
FLUSH_BYTES = 64 << 20


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class ParamsWriter:
    """Writes a params pytree into folder/params/ a few arrays at a time, so memory holds one group of
    arrays (or one large array), never the whole tree: Orbax partial saves into a work folder, one
    finalize, then a rename. The result is the same checkpoint `save_params` writes.

    Arrays are written uncompressed and without Orbax's defensive host copy (the caller hands each
    array over and never mutates it): measured on a 1.5 GB bf16 array, zstd plus the copy took 2.4x
    the time and twice the array's size in extra peak memory. Peak memory is then one array (or one
    batch of small ones) over the caller's own."""

    def __init__(self, folder: str, flush_bytes: int = FLUSH_BYTES):
        self.final = os.path.abspath(os.path.join(folder, PARAMS_DIR))
        self.work = self.final + ".orbax"
        if os.path.exists(self.final):
            raise MMDiTError(f"{self.final}: already exists")
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.work + ".partial_save", ignore_errors=True)
        self.flush_bytes = flush_bytes
        self.pending, self.pending_bytes, self.written = {}, 0, 0

    def add(self, path: tuple, array) -> None:
        array = np.asarray(array)
        if self.pending and self.pending_bytes + array.nbytes > self.flush_bytes:
            self.flush()
        _set(self.pending, tuple(path), array)
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.flush_bytes:  # a large array is written at once, not kept
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from orbax.checkpoint import v1 as ocp1
        from orbax.checkpoint.experimental.v1 import partial

        ctx = ocp1.Context()
        ctx.array.saving.use_compression = False
        ctx.memory.deepcopy_host_arrays = False
        # no cap on OCDBT data files: with the default 2 GB cap, tensorstore copies any larger array
        # before writing it (measured: a 3 GB bf16 array peaked at 2x; uncapped, no copy)
        ctx.array.saving.ocdbt_target_data_file_size = 0
        with ctx:
            partial.save(self.work, self.pending)
        self.written += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Finalize: folder/params/ appears complete or not at all."""
        from orbax.checkpoint.experimental.v1 import partial

        self.flush()
        if not self.written and not os.path.exists(self.work + ".partial_save"):
            raise MMDiTError(f"{self.final}: nothing to write")
        partial.finalize(self.work)
        # the v1 layout keeps the pytree under "state/"; params/ is that folder, as StandardCheckpointer
        # writes it
        os.rename(os.path.join(self.work, "state"), self.final)
        meta = os.path.join(self.work, "_CHECKPOINT_METADATA")
        if os.path.isfile(meta):  # where StandardCheckpointer keeps it (Orbax warns without it)
            shutil.copyfile(meta, os.path.join(self.final, "_CHECKPOINT_METADATA"))
        shutil.rmtree(self.work)

    def abort(self) -> None:
        for p in (self.work, self.work + ".partial_save"):
            shutil.rmtree(p, ignore_errors=True)


def params_path(folder: str) -> str:
    """The Orbax pytree directory holding a component's params (following a checkpoint.json pointer to
    its step's item folder)."""
    folder = paths.absolute(folder)
    pointer = paths.join(folder, POINTER_FILE)
    if not paths.isfile(pointer):
        return _params_dir(folder)
    spec, directory = _read_pointer(folder, pointer)
    mngr = ocp.CheckpointManager(directory)
    try:
        step = mngr.latest_step() if spec.get("step") is None else int(spec["step"])
    finally:
        mngr.close()
    if step is None:
        raise MMDiTError(f"{directory}: no finished checkpoint yet")
    path = paths.join(directory, str(step), str(spec["item"]))
    if not paths.isdir(path):
        raise MMDiTError(f"{directory}: step {step} has no item {spec['item']!r}")
    return path


def saved_leaves(folder: str) -> dict:
    """{path tuple: (shape, dtype)} of the params saved in an Orbax component folder (metadata only)."""
    path = params_path(folder)
    try:
        meta = ocp.StandardCheckpointer().metadata(path)
        meta = getattr(meta, "item_metadata", meta)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged checkpoint
        raise MMDiTError(f"{path}: not a readable Orbax checkpoint ({_first_line(e)})") from None
    if meta is None:
        raise MMDiTError(f"{path}: not a readable Orbax checkpoint (no metadata)")
    out = {}
    for p, v in jax.tree_util.tree_leaves_with_path(meta):
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
        out[key] = (tuple(v.shape), np.dtype(v.dtype))
    return out


def restore_groups(folder: str, targets: list, group_bytes: int = FLUSH_BYTES):
    """Yield {path: np.ndarray} for `targets` [(path, ShapeDtypeStruct)], restoring a few leaves at a
    time (Orbax partial restore), so memory holds one group, never the whole tree. Orbax casts to each
    target's dtype."""
    path = params_path(folder)
    ckptr = ocp.PyTreeCheckpointer()
    group, size = [], 0

    def run(group):
        tree = {}
        for p, t in group:
            _set(tree, p, jax.ShapeDtypeStruct(t.shape, t.dtype))
        args = jax.tree.map(lambda t: ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype), tree)
        try:
            out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=args,
                                                                  partial_restore=True))
        except Exception as e:  # noqa: BLE001 - metadata was readable, so this is damaged data
            raise MMDiTError(f"{path}: damaged Orbax checkpoint ({_first_line(e)})") from None
        res = {}
        for p, _ in group:
            node = out
            for k in p:
                node = node[k] if k in node else node[str(k)]
            res[p] = node
        return res

    for p, t in targets:
        n = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
        if group and size + n > group_bytes:
            yield run(group)
            group, size = [], 0
        group.append((tuple(p), t))
        size += n
    if group:
        yield run(group)
