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

import jax
import orbax.checkpoint as ocp

from mmdit_jax.errors import MMDiTError

PARAMS_DIR = "params"
POINTER_FILE = "checkpoint.json"


def is_orbax_component(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, PARAMS_DIR)) or \
        os.path.isfile(os.path.join(folder, POINTER_FILE))


def save_params(folder: str, params) -> None:
    """Writes `params` under folder/params/ (Orbax commits atomically: a partial save is never valid)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(folder, PARAMS_DIR)), params)
    ckptr.wait_until_finished()


def _target(template, shardings):
    """ShapeDtypeStructs carrying the wanted dtype (Orbax casts on restore) and placement."""
    if shardings is None:
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), template)
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
                             f"the config needs {tuple(shape)}")


def restore_params(folder: str, template, shardings=None):
    """The params pytree of an Orbax component folder, restored into `template`'s shapes and dtypes
    (a pytree of ShapeDtypeStructs) and, when given, `shardings` (a matching pytree of Shardings)."""
    folder = os.fspath(folder)
    target = _target(template, shardings)
    pointer = os.path.join(folder, POINTER_FILE)
    if os.path.isfile(pointer):
        return _restore_pointer(folder, pointer, target)
    path = os.path.abspath(os.path.join(folder, PARAMS_DIR))
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


def _restore_pointer(folder: str, pointer: str, target):
    with open(pointer) as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as e:
            raise MMDiTError(f"{pointer}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or "directory" not in spec or "item" not in spec:
        raise MMDiTError(f"{pointer}: needs \"directory\" and \"item\"")
    directory = os.path.abspath(os.path.join(folder, spec["directory"]))
    if not os.path.isdir(directory):
        raise MMDiTError(f"{pointer}: checkpoint directory {directory} does not exist")
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
