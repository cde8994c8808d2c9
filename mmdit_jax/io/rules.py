"""Declarative key maps between checkpoint layouts and the internal parameter tree.

A `Rule` names one internal parameter and, for each external layout ("diffusers", "original"), the
tensor(s) it comes from. Several keys are concatenated on the output axis (separate q/k/v into a fused
qkv). `kind` says how the tensor is stored externally:
- "linear": torch Linear weight (out, in) -> kernel (in, out)
- "vector": bias / norm scale, as is
- "patch":  conv weight (D, C, p, q) -> kernel (p*q*C, D), i.e. patches flattened as (p, q, c)
- "table":  (1, N, D) buffer -> (N, D)
- "conv":   torch conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O) (HWIO, for NHWC convolutions)
- "pointwise": torch 1x1 conv weight (O, I, 1, 1) -> Linear kernel (I, O)
`kind` may also be a mapping layout -> kind, for a tensor stored differently per layout (the LDM VAE
keeps attention projections as 1x1 convs where diffusers has Linears).
`swapped_in` lists layouts that store the two halves of the output axis in the other order (diffusers'
AdaLayerNormContinuous keeps (scale, shift) where the internal and original order is (shift, scale)).

A plan is a list of `Entry`s: a rule placed at an internal path, either single or stacked over blocks
(per layout, one external key prefix per stacked block). The same plan drives import and export, so the two can not
drift apart.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from mmdit_jax.errors import MMDiTError


@dataclasses.dataclass(frozen=True)
class Rule:
    path: str
    keys: Mapping[str, tuple[str, ...]]
    kind: str | Mapping[str, str] = "linear"
    swapped_in: tuple[str, ...] = ()
    parts: tuple[int, ...] | None = None  # output sizes of the keys when they are not equal


def rule(path, diffusers, original, kind="linear", swapped_in=(), parts=None):
    as_tuple = lambda k: (k,) if isinstance(k, str) else tuple(k)
    return Rule(path, {"diffusers": as_tuple(diffusers), "original": as_tuple(original)},
                kind, tuple(swapped_in), parts)


def linear(path, diffusers, original, **kw):
    """A Linear's weight and bias as two rules (`diffusers`/`original` are module names)."""
    d = (diffusers,) if isinstance(diffusers, str) else diffusers
    o = (original,) if isinstance(original, str) else original
    return [rule(f"{path}.kernel", [k + ".weight" for k in d], [k + ".weight" for k in o], "linear", **kw),
            rule(f"{path}.bias", [k + ".bias" for k in d], [k + ".bias" for k in o], "vector", **kw)]


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple
    rule: Rule
    prefixes: Mapping[str, tuple[str, ...]] | None = None  # None: not stacked; else, per layout,
    # one key prefix per stacked block


def _swap_halves(a, axis):
    h = a.shape[axis] // 2
    first, second = np.split(a, [h], axis=axis)
    return np.concatenate([second, first], axis=axis)


def kind_of(rule: Rule, layout: str) -> str:
    return rule.kind[layout] if isinstance(rule.kind, Mapping) else rule.kind


def to_internal(rule: Rule, arrays: Sequence[np.ndarray], layout: str) -> np.ndarray:
    swap = layout in rule.swapped_in
    kind = kind_of(rule, layout)
    if kind in ("conv", "pointwise"):
        (w,) = arrays
        if kind == "conv" and w.ndim == 4:
            return w.transpose(2, 3, 1, 0)
        if kind == "pointwise" and (w.ndim == 2 or (w.ndim == 4 and w.shape[2:] == (1, 1))):
            return w.reshape(w.shape[:2]).T  # a Linear-shaped (O, I) copy is accepted as well
        return w  # left as is: import_params reports the shape against the model's
    if kind in ("linear", "vector"):
        a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        if swap:
            a = _swap_halves(a, 0)
        return a.T if kind == "linear" else a
    if kind == "patch":
        (w,) = arrays
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    if kind == "table":
        (t,) = arrays
        return t.reshape(t.shape[-2], t.shape[-1])
    raise ValueError(f"unknown rule kind {kind!r}")


def from_internal(rule: Rule, a: np.ndarray, layout: str, patch: int | None = None) -> list[np.ndarray]:
    n = len(rule.keys[layout])
    kind = kind_of(rule, layout)
    if kind == "conv":
        return [np.ascontiguousarray(a.transpose(3, 2, 0, 1))]
    if kind == "pointwise":
        return [np.ascontiguousarray(a.T[:, :, None, None])]
    if kind in ("linear", "vector"):
        a = a.T if kind == "linear" else a
        if layout in rule.swapped_in:
            a = _swap_halves(a, 0)
        if n == 1:
            return [np.ascontiguousarray(a)]
        cuts = np.cumsum(rule.parts)[:-1] if rule.parts else n
        return [np.ascontiguousarray(x) for x in np.split(a, cuts, axis=0)]
    if kind == "patch":
        d = a.shape[1]
        c = a.shape[0] // (patch * patch)
        return [np.ascontiguousarray(a.reshape(patch, patch, c, d).transpose(3, 2, 0, 1))]
    if kind == "table":
        return [a[None]]
    raise ValueError(f"unknown rule kind {kind!r}")


def _flat_shapes(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_shapes(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def to_device(arr, target):
    """One tensor at a time: read (from a memmap), cast to the parameter's dtype, place on device."""
    import jax.numpy as jnp

    return jnp.asarray(np.asarray(arr).astype(np.dtype(target.dtype), copy=False))


def import_params(plan: Sequence[Entry], tensors: Mapping[str, np.ndarray], layout: str,
                  template: Mapping, origin: str, convert: Callable = to_device):
    """Build the internal pure-dict tree from `tensors`.

    `template` is the abstract pure dict (ShapeDtypeStructs) of the model, in the dtypes wanted; every
    leaf must be produced exactly once. Missing, unexpected and mis-shaped keys are all collected into
    one error. `convert(array, template_leaf)` places each array (default: cast and put on device)."""
    want = _flat_shapes(template)
    params, used, missing, bad = {}, set(), [], []
    for entry in plan:
        keys = entry.rule.keys[layout]
        prefixes = entry.prefixes[layout] if entry.prefixes is not None else ("",)
        names = [[p + k for k in keys] for p in prefixes]
        absent = [n for group in names for n in group if n not in tensors]
        used.update(n for group in names for n in group)  # a partial group's keys are not "unexpected"
        if absent:
            missing.extend(absent)
            continue
        parts = [to_internal(entry.rule, [tensors[n] for n in group], layout) for group in names]
        arr = np.stack(parts) if entry.prefixes is not None else parts[0]
        target = want.get(entry.path)
        if target is None:
            raise AssertionError(f"plan path {entry.path} is not a model parameter")
        if tuple(arr.shape) != tuple(target.shape):
            bad.append(f"{', '.join(names[0])}: got {tuple(arr.shape)} expected {tuple(target.shape)}"
                       " (internal layout)")
            continue
        _set(params, entry.path, convert(arr, target))
    unexpected = sorted(set(tensors) - used)
    produced = set(_flat_shapes(params)) | {e.path for e in plan}
    uncovered = sorted(set(want) - produced)
    if uncovered:
        raise AssertionError(f"plan does not cover model parameters {uncovered}")
    if missing or unexpected or bad:
        msg = [f"{origin}: checkpoint does not match the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {', '.join(sorted(missing)[:20])}"
                       + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                       + (" ..." if len(unexpected) > 20 else ""))
        if bad:
            msg.append(f"mis-shaped ({len(bad)}): {'; '.join(bad[:20])}")
        raise MMDiTError("; ".join(msg))
    return params


def export_params(plan: Sequence[Entry], params: Mapping, layout: str, patch: int | None = None):
    """Yield (external key, numpy array) for every tensor of `layout`, one at a time."""
    flat = _flat_shapes(params)
    for entry in plan:
        keys = entry.rule.keys[layout]
        arr = np.asarray(flat[entry.path])
        if entry.prefixes is None:
            yield from zip(keys, from_internal(entry.rule, arr, layout, patch))
        else:
            for i, p in enumerate(entry.prefixes[layout]):
                for k, t in zip(keys, from_internal(entry.rule, arr[i], layout, patch)):
                    yield p + k, t
