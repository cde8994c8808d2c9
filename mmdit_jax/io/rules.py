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
`reshaped` > 0: the internal array is the plain (in, out) matrix (a bias: the plain vector) reshaped,
row-major, to the model's shape, whose first `reshaped` axes span the input (fused projections that
keep their parts on an axis of their own, see layers.Linear); the numbers are the same bit for bit.

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
    reshaped: int = 0


def rule(path, diffusers, original, kind="linear", swapped_in=(), parts=None, reshaped=0):
    as_tuple = lambda k: (k,) if isinstance(k, str) else tuple(k)
    return Rule(path, {"diffusers": as_tuple(diffusers), "original": as_tuple(original)},
                kind, tuple(swapped_in), parts, reshaped)


def plain_shape(rule: Rule, shape: tuple, layout: str) -> tuple:
    """The shape of the plain matrix / vector that an internal array of `shape` holds (`reshaped`)."""
    shape = tuple(shape)
    if not rule.reshaped:
        return shape
    if kind_of(rule, layout) == "linear":
        return (int(np.prod(shape[:rule.reshaped])), int(np.prod(shape[rule.reshaped:])))
    return (int(np.prod(shape)),)


def linear(path, diffusers, original, **kw):
    """A Linear's weight and bias as two rules (`diffusers`/`original` are module names)."""
    d = (diffusers,) if isinstance(diffusers, str) else diffusers
    o = (original,) if isinstance(original, str) else original
    return [rule(f"{path}.kernel", [k + ".weight" for k in d], [k + ".weight" for k in o], "linear", **kw),
            rule(f"{path}.bias", [k + ".bias" for k in d], [k + ".bias" for k in o], "vector", **kw)]


def tree_path(key: str) -> tuple:
    """A dotted module path ("blocks.0.attn") as a params-tree path with ints for digits
    (("blocks", 0, "attn")); outer dots are ignored."""
    return tuple(int(p) if p.isdigit() else p for p in key.strip(".").split("."))


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple
    rule: Rule
    prefixes: Mapping[str, tuple[str, ...]] | None = None  # None: not stacked; else, per layout,
    # one key prefix per stacked block


def stacked_entries(tree_prefix: tuple, rules: Sequence[Rule], indices, diffusers: str,
                    original: str) -> list[Entry]:
    """Entries of one stack of blocks: parameters under `tree_prefix` + the rule's path, block `i`'s keys
    under `{diffusers}.{i}.` / `{original}.{i}.` for each i in `indices`."""
    prefixes = {"diffusers": tuple(f"{diffusers}.{i}." for i in indices),
                "original": tuple(f"{original}.{i}." for i in indices)}
    return [Entry(tree_prefix + tree_path(r.path), r, prefixes) for r in rules]


def _swap_halves(a, axis):
    h = a.shape[axis] // 2
    first, second = np.split(a, [h], axis=axis)
    return np.concatenate([second, first], axis=axis)


_INTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_BAND = 512  # rows per band when copying a transposed matrix (measured best on a 21504 x 3072 bf16)


def copy_into(dst: np.ndarray, src) -> None:
    """dst[...] = src, fast for the transposed matrices every Linear import / export produces: numpy
    copies a transposed view element by element across the whole matrix (5.5 s for FLUX's 130 MB
    linear1 in bfloat16, which numpy handles as an opaque type); band by band through same-size
    integer views it takes 0.7 s. Casts, where dtypes differ, follow numpy's (and ml_dtypes') rules."""
    src = np.asarray(src)
    if src.dtype == dst.dtype and dst.dtype.itemsize in _INTS:
        dst, src = dst.view(_INTS[dst.dtype.itemsize]), src.view(_INTS[dst.dtype.itemsize])
    if src.ndim == 2 and src.shape == dst.shape and not src.flags.c_contiguous and src.flags.f_contiguous:
        rows = src.T  # C-ordered: rows of it are columns of src
        for i in range(0, rows.shape[0], _BAND):
            dst[:, i:i + _BAND] = rows[i:i + _BAND].T
    else:
        dst[...] = src


def contiguous(a) -> np.ndarray:
    """A C-ordered copy of `a` (or `a` itself when it already is one), via `copy_into`."""
    a = np.asarray(a)
    if a.flags.c_contiguous:
        return a
    out = np.empty(a.shape, a.dtype)
    copy_into(out, a)
    return out


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
    a = a.reshape(plain_shape(rule, a.shape, layout))
    if kind == "conv":
        return [np.ascontiguousarray(a.transpose(3, 2, 0, 1))]
    if kind == "pointwise":
        return [np.ascontiguousarray(a.T[:, :, None, None])]
    if kind in ("linear", "vector"):
        a = a.T if kind == "linear" else a
        if layout in rule.swapped_in:
            a = _swap_halves(a, 0)
        if n == 1:
            return [contiguous(a)]
        cuts = np.cumsum(rule.parts)[:-1] if rule.parts else n
        return [contiguous(x) for x in np.split(a, cuts, axis=0)]
    if kind == "patch":
        d = a.shape[1]
        c = a.shape[0] // (patch * patch)
        return [np.ascontiguousarray(a.reshape(patch, patch, c, d).transpose(3, 2, 0, 1))]
    if kind == "table":
        return [a[None]]
    raise ValueError(f"unknown rule kind {kind!r}")


def internal_shape(rule: Rule, shapes: Sequence[tuple], layout: str) -> tuple | None:
    """The shape `to_internal` gives for tensors of `shapes`, without reading them (None: the parts can
    not be joined). tests/test_convert_rules.py checks it against `to_internal` for every kind."""
    kind = kind_of(rule, layout)
    s = tuple(shapes[0])
    if kind == "conv":
        return (s[2], s[3], s[1], s[0]) if len(s) == 4 else s
    if kind == "pointwise":
        if len(s) == 2 or (len(s) == 4 and s[2:] == (1, 1)):
            return (s[1], s[0])
        return s
    if kind in ("linear", "vector"):
        if any(len(x) != len(s) or tuple(x[1:]) != s[1:] for x in shapes):
            return None
        joined = (sum(x[0] for x in shapes),) + s[1:]
        return tuple(reversed(joined)) if kind == "linear" else joined
    if kind == "patch":
        return (s[2] * s[3] * s[1], s[0]) if len(s) == 4 else None
    if kind == "table":
        return (s[-2], s[-1]) if len(s) >= 2 else None
    raise ValueError(f"unknown rule kind {kind!r}")


def external_shapes(rule: Rule, shape: tuple, layout: str, patch: int | None = None) -> list[tuple]:
    """The shapes `from_internal` gives for an internal array of `shape` (checked like internal_shape)."""
    n = len(rule.keys[layout])
    kind = kind_of(rule, layout)
    s = plain_shape(rule, shape, layout)
    if kind == "conv":
        return [(s[3], s[2], s[0], s[1])]
    if kind == "pointwise":
        return [(s[1], s[0], 1, 1)]
    if kind in ("linear", "vector"):
        t = tuple(reversed(s)) if kind == "linear" else s
        if n == 1:
            return [t]
        sizes = list(rule.parts) if rule.parts else [t[0] // n] * n
        return [(k,) + t[1:] for k in sizes]
    if kind == "patch":
        return [(s[1], s[0] // (patch * patch), patch, patch)]
    if kind == "table":
        return [(1,) + s]
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
    """One tensor at a time: read (from a memmap), cast to the parameter's dtype, place on device
    (on `target.sharding` when the template carries one)."""
    import jax
    import jax.numpy as jnp

    arr = np.asarray(arr).astype(np.dtype(target.dtype), copy=False)
    sharding = getattr(target, "sharding", None)
    return jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)


@dataclasses.dataclass(frozen=True)
class Item:
    """One internal parameter: its plan entry, the external names per stacked block (one group when
    not stacked) and its target (ShapeDtypeStruct in the wanted dtype)."""
    entry: Entry
    names: tuple[tuple[str, ...], ...]
    target: object

    @property
    def path(self) -> tuple:
        return self.entry.path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.target.shape, dtype=np.int64)) * np.dtype(self.target.dtype).itemsize


def _shape_of(tensors, name):
    return tuple(tensors.shape(name)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[name]))


def check(plan: Sequence[Entry], tensors: Mapping, layout: str, template: Mapping, origin: str) -> list[Item]:
    """Every parameter's source tensors, checked from names and header shapes only (no tensor data is
    read): missing, unexpected and mis-shaped keys are all collected into one error."""
    want = _flat_shapes(template)
    items, used, missing, bad = [], set(), [], []
    for entry in plan:
        keys = entry.rule.keys[layout]
        prefixes = entry.prefixes[layout] if entry.prefixes is not None else ("",)
        names = tuple(tuple(p + k for k in keys) for p in prefixes)
        absent = [n for group in names for n in group if n not in tensors]
        used.update(n for group in names for n in group)  # a partial group's keys are not "unexpected"
        target = want.get(entry.path)
        if target is None:
            raise AssertionError(f"plan path {entry.path} is not a model parameter")
        if absent:
            missing.extend(absent)
            continue
        # stacked: every block must have the per-block shape; name the first that does not
        want_shape = plain_shape(entry.rule, target.shape[1:] if entry.prefixes is not None else target.shape,
                                 layout)
        if entry.prefixes is not None and target.shape[0] != len(names):
            raise AssertionError(f"plan path {entry.path}: {len(names)} blocks for shape {target.shape}")
        wrong = next(((group, shape) for group in names
                      for shape in [internal_shape(entry.rule, [_shape_of(tensors, n) for n in group], layout)]
                      if shape is None or tuple(shape) != want_shape), None)
        if wrong is not None:
            group, shape = wrong
            got = shape if shape is not None else [_shape_of(tensors, n) for n in group]
            bad.append(f"{', '.join(group)}: got {got} expected {want_shape} (internal layout)")
            continue
        items.append(Item(entry, names, target))
    unexpected = sorted(set(tensors) - used)
    uncovered = sorted(set(want) - {e.path for e in plan})
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
    return items


def build(item: Item, tensors: Mapping, layout: str) -> np.ndarray:
    """The internal array of one checked parameter, in the target dtype. Stacked parameters are filled
    block by block, so memory holds the result plus one block's source (memmaps are dropped as they go)."""
    dtype = np.dtype(item.target.dtype)
    rule = item.entry.rule
    out = np.empty(tuple(item.target.shape), dtype)
    if item.entry.prefixes is None:
        copy_into(out.reshape(plain_shape(rule, out.shape, layout)),
                  to_internal(rule, [tensors[n] for n in item.names[0]], layout))
        return out
    for i, group in enumerate(item.names):
        copy_into(out[i].reshape(plain_shape(rule, out.shape[1:], layout)),
                  to_internal(rule, [tensors[n] for n in group], layout))
    return out


def iter_params(plan, tensors, layout, template, origin):
    """Yield (internal path, numpy array in the target dtype) one parameter at a time, after checking
    the whole checkpoint (so a bad file fails before anything is produced)."""
    for item in check(plan, tensors, layout, template, origin):
        yield item.path, build(item, tensors, layout)


def import_params(plan: Sequence[Entry], tensors: Mapping[str, np.ndarray], layout: str,
                  template: Mapping, origin: str, convert: Callable = to_device):
    """Build the internal pure-dict tree from `tensors`.

    `template` is the abstract pure dict (ShapeDtypeStructs) of the model, in the dtypes wanted; every
    leaf must be produced exactly once. Missing, unexpected and mis-shaped keys are all collected into
    one error. `convert(array, template_leaf)` places each array (default: cast and put on device)."""
    params = {}
    for item in check(plan, tensors, layout, template, origin):
        _set(params, item.path, convert(build(item, tensors, layout), item.target))
    return params


def export_entry(entry: Entry, arr, layout: str, patch: int | None = None):
    """Yield (external key, numpy array) for one internal parameter."""
    keys = entry.rule.keys[layout]
    if entry.prefixes is None:
        yield from zip(keys, from_internal(entry.rule, np.asarray(arr), layout, patch))
    else:
        for i, p in enumerate(entry.prefixes[layout]):
            for k, t in zip(keys, from_internal(entry.rule, np.asarray(arr[i]), layout, patch)):
                yield p + k, t


def export_specs(entry: Entry, shape: tuple, layout: str, patch: int | None = None):
    """(external key, shape) of every tensor `export_entry` yields for an internal array of `shape`."""
    keys = entry.rule.keys[layout]
    if entry.prefixes is None:
        return list(zip(keys, external_shapes(entry.rule, shape, layout, patch)))
    shapes = external_shapes(entry.rule, tuple(shape[1:]), layout, patch)
    return [(p + k, s) for p in entry.prefixes[layout] for k, s in zip(keys, shapes)]


def export_params(plan: Sequence[Entry], params: Mapping, layout: str, patch: int | None = None):
    """Yield (external key, numpy array) for every tensor of `layout`, one at a time."""
    flat = _flat_shapes(params)
    for entry in plan:
        yield from export_entry(entry, flat[entry.path], layout, patch)
