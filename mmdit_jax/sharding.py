"""Logical axis names -> mesh axes, in one table.

Parameters are annotated with logical names where they are created (layers.py); activations use the
same names. Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with sharded parameters),
"tensor" (model parallel over heads / MLP width), "sequence" (context parallel over tokens).
"""
from __future__ import annotations

import functools
from typing import Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axis (or tuple of axes, or None for replicated). First match wins.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("layers", None),  # the scan axis is never sharded
    ("embed", "fsdp"),
    ("embed_out", None),
    ("cond", None),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mod", "tensor"),
    ("patch", None),
    ("out", None),
    ("pos", None),
    ("norm", None),
)


def logical_to_spec(names: Iterable[str | None], rules=LOGICAL_RULES, mesh=None) -> P:
    """PartitionSpec for a tuple of logical names; a mesh axis is used at most once per array and
    axes absent from (or of size 1 in) `mesh` are dropped."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def variable_sharding(v: nnx.Variable, mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding of one variable from its `out_sharding` logical annotation (replicated if none),
    completed by `fsdp_fill`."""
    shape = v.get_value().shape
    names = v.get_metadata().get("out_sharding") or (None,) * len(shape)
    spec = dividing(logical_to_spec(names, rules, mesh), shape, mesh)
    return NamedSharding(mesh, fsdp_fill(spec, names, shape, mesh))


def dividing(spec: P, shape, mesh) -> P:
    """`spec` without the mesh axes that do not divide their dimension (that dimension is replicated
    instead): any model loads on any mesh, e.g. 24 heads' widths on a tensor axis of 16."""
    parts = []
    for p, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
        axes = () if p is None else (p,) if isinstance(p, str) else tuple(p)
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        parts.append(p if size % n == 0 else None)
    return P(*parts)


def fsdp_fill(spec: P, names, shape, mesh) -> P:
    """FSDP shards every parameter, not only those with an "embed" axis: biases, norm scales and
    buffers left replicated by the rules are split over "fsdp" on their first free dimension that
    divides (never the scanned "layers" axis). Otherwise these leftovers, replicated on every device,
    would keep per-device memory well above 1/n of the state on small or wide-bias models."""
    n = mesh.shape.get("fsdp", 1)
    parts = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for p in parts if p is not None for a in ((p,) if isinstance(p, str) else p)}
    if n == 1 or "fsdp" in used:
        return spec
    for i, (name, size) in enumerate(zip(names, shape)):
        if parts[i] is None and name != "layers" and size % n == 0:
            parts[i] = "fsdp"
            return P(*parts)
    return spec


TOKENS = ("batch", "seq", None)  # logical axes of the blocks' token streams


def ambient_mesh():
    """The ambient (abstract) mesh (jax.set_mesh / use_abstract_mesh) when it spans more than one
    device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh


def sequence_mesh():
    """The ambient (abstract) mesh when it has a "sequence" axis of size > 1, else None."""
    mesh = ambient_mesh()
    if mesh is None or mesh.shape.get("sequence", 1) == 1:
        return None
    return mesh


def under_mesh(fn, mesh):
    """`fn` traced with `mesh` as the ambient (abstract) mesh; `fn` itself when mesh is None. Models
    run under the mesh their arrays live on: it makes attention context parallel with a "sequence"
    axis and keeps Mosaic kernels inside a shard_map on any mesh (mmdit_jax.attention)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return run


def constrain(x, names, rules=LOGICAL_RULES):
    """with_sharding_constraint of an activation to its logical axes under the ambient mesh
    (jax.set_mesh / use_abstract_mesh; a no-op without one); mesh axes that do not divide their
    dimension are left out. Left to itself, XLA's propagation under "tensor" splits the token stream
    over channels (after each row-parallel projection) and the adaLN modulations like their kernels,
    then regathers both inside every block; and under "sequence" it does not split tokens at all."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, dividing(logical_to_spec(names, rules, mesh), x.shape, mesh))


def make_mesh(shape: dict[str, int], devices=None):
    """Mesh over MESH_AXES; a size of -1 takes the devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into a mesh of fixed size {known}")
        sizes[fill[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
                         f"have {len(devices)}")
    # Auto axes: XLA propagates shardings from the annotated parameters and inputs (GSPMD), so model
    # code needs no per-op out_sharding.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
