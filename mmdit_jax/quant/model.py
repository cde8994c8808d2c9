"""Quantised transformer structures and params: which kernels, their scale variables, and turning float
params (in memory, or streamed from a checkpoint) into quantised ones."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.layers import Linear
from mmdit_jax.quant.formats import QuantSpec, check_dtype, quantize, spec_of_storage
from mmdit_jax.stacking import Stack


class QuantScale(nnx.Variable):
    """Per-output-channel scales of a quantised kernel (frozen, like the kernel)."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One quantised kernel: its params path (of the Linear) and the kernel's axes."""
    path: tuple
    lead: int  # stacked ("layers") axes in front
    n_in: int
    n_out: int

    @property
    def in_axes(self) -> tuple[int, ...]:
        return tuple(range(self.lead, self.lead + self.n_in))


def block_linears(module: nnx.Module) -> list[tuple[tuple, Linear]]:
    """(path, Linear) of every Linear inside a block stack: the kernels quantisation applies to."""
    stacks = [path for path, node in nnx.iter_graph(module) if isinstance(node, Stack)]
    return [(tuple(path), node) for path, node in nnx.iter_graph(module)
            if isinstance(node, Linear) and any(tuple(path[:len(s)]) == tuple(s) for s in stacks)]


def quantize_module(module: nnx.Module, spec: QuantSpec) -> nnx.Module:
    """`module` (abstract, built in the compute dtype) with its block kernels stored in `spec`'s format
    plus their `kernel_scale` variables (modified in place and returned)."""
    linears = block_linears(module)
    if not linears:
        raise MMDiTError(f"quantize={spec}: this model has no block stacks to quantise")
    for _, lin in linears:
        k = lin.kernel.get_value()
        check_dtype(spec, k.dtype)
        names = lin.kernel.get_metadata().get("out_sharding") or (None,) * len(k.shape)
        lead = len(k.shape) - lin.n_in - lin.n_out
        keep = tuple(range(lead)) + tuple(range(len(k.shape) - lin.n_out, len(k.shape)))
        lin.kernel.set_value(jax.ShapeDtypeStruct(k.shape, spec.storage))
        lin.kernel_scale = QuantScale(jax.ShapeDtypeStruct(tuple(k.shape[i] for i in keep), k.dtype),
                                      sharding_names=tuple(names[i] for i in keep), eager_sharding=False)
        lin.dot = spec.dot
    return module


def sites(module: nnx.Module) -> list[Site]:
    """The quantised kernels of a quantised (abstract) module."""
    out = []
    for path, lin in block_linears(module):
        if getattr(lin, "kernel_scale", None) is not None:
            shape = lin.kernel.get_value().shape
            out.append(Site(path, len(shape) - lin.n_in - lin.n_out, lin.n_in, lin.n_out))
    return out


def _node(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def quantize_params(params: dict, site_list, spec: QuantSpec, dtype) -> dict:
    """Float params (the model's plain dict) -> quantised params: every site's kernel replaced by
    (kernel in the storage dtype, kernel_scale in `dtype`), every other float leaf cast to `dtype`.
    Pure; jit it to keep the float copy out of memory."""
    out = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    for site in site_list:
        src = _node(params, site.path)
        node = _copy_path(out, site.path)
        node["kernel"], node["kernel_scale"] = quantize(src["kernel"], spec, site.in_axes, dtype)
    return out


def dequantize_params(params: dict, site_list, dtype) -> dict:
    """Quantised params -> the float params of the unquantised structure (kernels as q * scale)."""
    from mmdit_jax.quant.formats import dequantize

    out = dict(params)
    for site in site_list:
        node = _copy_path(out, site.path)
        node["kernel"] = dequantize(node["kernel"], node.pop("kernel_scale"), site.in_axes, dtype)
    return out


def requantize(kernel, scale, delta, in_axes: tuple[int, ...]):
    """(q, scale) of (kernel * scale + delta) in the kernel's own format (LoRA merged into a quantised
    kernel): dequantised in float32, the update added, quantised again with fresh scales."""
    from mmdit_jax.quant.formats import dequantize

    spec = spec_of_storage(kernel.dtype)
    w = dequantize(kernel, scale, in_axes, jnp.float32) + delta.astype(jnp.float32)
    return quantize(w, spec, in_axes, scale.dtype)


def _copy_path(tree: dict, path) -> dict:
    node = tree
    for p in path:
        node[p] = dict(node[p])
        node = node[p]
    return node


def load_quantized(weights, site_list, spec: QuantSpec, dtype, shardings=None) -> dict:
    """Quantised params straight from a checkpoint (`io.component.ComponentWeights` in `dtype`): each
    parameter is read on its own and every kernel quantised on the host one stacked layer at a time, so
    neither host nor device ever holds the float model (device memory: the quantised model only)."""
    kernels = {site.path + ("kernel",): site for site in site_list}
    params: dict = {}

    def put(path, arr):
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        sh = _node(shardings, path) if shardings is not None else None
        node[path[-1]] = jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr)

    for path, arr in weights.stream():
        path = tuple(path)
        site = kernels.get(path)
        if site is None:
            put(path, np.asarray(arr))
            continue
        arr = np.asarray(arr)
        rows = [quantize(arr[i], spec, tuple(a - 1 for a in site.in_axes), dtype, xp=np) for i in
                range(arr.shape[0])] if site.lead else [quantize(arr, spec, site.in_axes, dtype, xp=np)]
        del arr
        q = np.stack([r[0] for r in rows]) if site.lead else rows[0][0]
        s = np.stack([r[1] for r in rows]) if site.lead else rows[0][1]
        del rows
        put(path, q)
        put(path[:-1] + ("kernel_scale",), s)
    return params



def quantize_transformer(model, quantize):
    """A quantised copy of an in-memory `mmdit_jax.transformer.Transformer` (its float params are kept
    as they are; the copy computes in the model's dtype)."""
    from mmdit_jax.quant.formats import parse_quantize
    from mmdit_jax.transformer import Transformer, abstract_module

    spec = parse_quantize(quantize)
    if spec is None:
        return model
    if model.quantize is not None:
        raise MMDiTError(f"quantize={spec}: the model is already quantised ({model.quantize})")
    site_list = sites(abstract_module(model.config, model.dtype, spec))
    params = jax.jit(lambda p: quantize_params(p, site_list, spec, model.dtype))(model.params)
    return Transformer(model.config, params, model.dtype, spec)
