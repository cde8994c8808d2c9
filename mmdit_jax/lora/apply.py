"""Running a model with LoRA adapters: merged into the kernels, or applied on the activations.

merged:   W' = W + sum_i s_i * sum_parts (alpha/rank) A B        (sampling; no per-step cost)
unmerged: y  = x W + b + sum_i s_i * (alpha/rank) dropout(x) A B  (training; dropout, exact grads)

Both are pure functions of (base params, adapters, scales). The unmerged form swaps each adapted
Linear of the model's structure for a `LoraLinear` (a Linear with the low-rank factors as extra
variables), so the model files stay untouched and a model without adapters runs exactly as before.
All parts and adapters of one Linear are concatenated on the rank axis (A side by side, B block-wise
in their output columns): one low-rank product per Linear, scanned with its block like the kernel.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.rules import tree_path
from mmdit_jax.layers import Linear
from mmdit_jax.lora.adapter import LoRA


class LoraState(nnx.Variable):
    """Low-rank factors, scales and dropout keys placed into the structure for one call."""


class LoraLinear(Linear):
    """A Linear with y += dropout(x) A diag(scale) B computed in the adapters' dtype."""

    def __init__(self, base: Linear, rank: int, dtype, rate: float, with_key: bool):
        self.kernel, self.bias = base.kernel, base.bias
        self.kernel_scale, self.dot = base.kernel_scale, base.dot  # a quantised base (mmdit_jax.quant)
        self.n_in, self.n_out = base.n_in, base.n_out
        shape = base.kernel.shape
        lead = shape[:len(shape) - self.n_in - self.n_out]
        # the factors act on the plain (in, out) matrix that a fused kernel reshapes (layers.Linear)
        cut = len(lead) + self.n_in
        din, dout = math.prod(shape[len(lead):cut]), math.prod(shape[cut:])
        sds = lambda shape, dt: LoraState(jax.ShapeDtypeStruct(lead + shape, dt))
        self.lora_a = sds((din, rank), dtype)
        self.lora_b = sds((rank, dout), dtype)
        self.lora_scale = sds((rank,), jnp.float32)
        self.lora_key = sds((2,), jnp.uint32) if with_key else None
        self.rate = rate

    def __call__(self, x):
        y = super().__call__(x)
        a = self.lora_a[...]
        h = x.astype(a.dtype)
        if self.lora_key is not None:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.lora_key[...]), 1.0 - self.rate,
                                        h.shape)
            h = jnp.where(keep, h / (1.0 - self.rate), 0).astype(h.dtype)
        k = self.kernel.shape  # inside the block scan: one block's kernel
        a = a.reshape(k[:self.n_in] + a.shape[-1:])
        b = self.lora_b[...]
        b = b.reshape(b.shape[:1] + k[self.n_in:])
        d = jnp.tensordot(jnp.tensordot(h, a, axes=self.n_in) * self.lora_scale[...].astype(a.dtype), b, axes=1)
        return y + d.astype(y.dtype)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _copy_path(tree: dict, path) -> dict:
    """A shallow copy of `tree` with fresh dicts along `path`; returns the copied node at its end."""
    node = tree
    for p in path:
        node[p] = dict(node[p])
        node = node[p]
    return node


def _check(loras, scales):
    if isinstance(loras, LoRA):
        loras = [loras]
    loras = list(loras)
    if scales is None:
        scales = [1.0] * len(loras)
    elif not isinstance(scales, (list, tuple)):
        scales = [scales]
    if len(scales) != len(loras):
        raise MMDiTError(f"{len(loras)} LoRA adapters but {len(scales)} scales")
    return loras, list(scales)


def factors(loras: Sequence[LoRA], scales, key: str, matrix_shape) -> tuple:
    """(A, B, scale) of every part of every adapter on one Linear, concatenated on the rank axis:
    A (..., in, R), B (..., R, out), scale (..., R); `...` is the stacked rows axis if any."""
    lead, (din, dout) = tuple(matrix_shape[:-2]), tuple(matrix_shape[-2:])
    aa, bb, cc = [], [], []
    for lora, s in zip(loras, scales):
        for name, part in sorted(lora.parts.get(key, {}).items()):
            w = lora.weights[key][name]
            a, b = w["A"], w["B"]
            r = a.shape[-1]
            c = jnp.asarray(part.scales(r)) * jnp.asarray(s, jnp.float32)  # (K, r)
            full_cols = (part.start, part.stop) == (0, dout)
            if part.rows is None:
                c = c[0]
                if not full_cols:
                    b = jnp.zeros((r, dout), b.dtype).at[:, part.start:part.stop].set(b)
            elif part.rows == tuple(range(lead[0])) and full_cols:
                pass
            else:
                idx = np.asarray(part.rows)
                a = jnp.zeros(lead + (din, r), a.dtype).at[idx].set(a)
                b = jnp.zeros(lead + (r, dout), b.dtype).at[idx, :, part.start:part.stop].set(b)
                c = jnp.zeros(lead + (r,), jnp.float32).at[idx].set(c)
            aa.append(a)
            bb.append(b)
            cc.append(c)
    if not aa:
        return None
    dtype = jnp.result_type(*aa, *bb)
    return (jnp.concatenate([a.astype(dtype) for a in aa], -1),
            jnp.concatenate([b.astype(dtype) for b in bb], -2), jnp.concatenate(cc, -1))


def _matrix_shape(loras, key: str, kernel_shape) -> tuple:
    """(*lead, in, out): the stacked rows and the plain matrix of a kernel stored fused (reshaped,
    see layers.Linear); the factors' A gives the rows and the input width."""
    a = next(lora.weights[key][name]["A"] for lora in loras if key in lora.parts for name in lora.parts[key])
    lead, din = tuple(kernel_shape[:a.ndim - 2]), a.shape[-2]
    return lead + (din, math.prod(kernel_shape[len(lead):]) // din)


def _keys(loras):
    keys = sorted({k for lora in loras for k in lora.parts})
    families = {lora.family for lora in loras}
    if len(families) > 1:
        raise MMDiTError(f"LoRA adapters of different families {sorted(families)} cannot be combined")
    return keys


def merge(params, loras: LoRA | Sequence[LoRA], scales=None):
    """params with every adapter's update added into its kernels (pure; jit-able).

    The update is formed in float32 (or the adapters' wider dtype) and rounded once into the
    kernel's dtype, so a bfloat16 base receives one rounding per kernel. A quantised kernel (int8 /
    fp8 with its `kernel_scale`) is dequantised, updated and quantised again with fresh scales."""
    loras, scales = _check(loras, scales)
    out = dict(params)
    for key in _keys(loras):
        node = _copy_path(out, tree_path(key))
        kernel = node["kernel"]
        matrix = _matrix_shape(loras, key, kernel.shape)
        a, b, c = factors(loras, scales, key, matrix)
        delta = jnp.einsum("...ir,...ro->...io", a * c[..., None, :].astype(a.dtype), b,
                           precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
        if "kernel_scale" in node:
            from mmdit_jax.quant.model import requantize

            lead, n_in = len(matrix) - 2, kernel.ndim - node["kernel_scale"].ndim
            node["kernel"], node["kernel_scale"] = requantize(kernel, node["kernel_scale"], delta,
                                                              tuple(range(lead, lead + n_in)))
            continue
        wide = jnp.promote_types(kernel.dtype, delta.dtype)
        node["kernel"] = (kernel.astype(wide) + delta.astype(wide)).astype(kernel.dtype)
    return out


@functools.lru_cache(maxsize=32)
def _structure(config, dtype, spec, rate, quantize=None):
    """The model's structure with `LoraLinear`s at the adapted paths."""
    from mmdit_jax.structure import Structure
    from mmdit_jax.transformer import abstract_module

    module = abstract_module(config, dtype, quantize)
    for key, rank, adapter_dtype, with_key in spec:
        path = tree_path(key)
        parent = module
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        base = getattr(parent, path[-1])
        if not isinstance(base, Linear):
            raise AssertionError(f"{key} is not a Linear")
        setattr(parent, path[-1], LoraLinear(base, rank, adapter_dtype, rate, with_key))
    return Structure(module)


def _as_key(rng):
    if jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))


def apply_lora(model, params, loras: LoRA | Sequence[LoRA], latents, sigma, context, pooled,
               guidance=None, *, scales=None, merged: bool = False, dropout: float = 0.0, rng=None,
               remat: str = "none", references=None):
    """The model's velocity with adapters; `model` is a `Transformer` (its config and dtype are used),
    `params` its (possibly bfloat16, possibly sharded) base params.

    merged=True folds the adapters into the kernels first (sampling); otherwise they act on the
    activations, with dropout `dropout` on each adapter's input when `rng` is given (training).
    `references`: FLUX.2's reference latents, as `Transformer.apply` takes them."""
    loras, scales = _check(loras, scales)
    if merged:
        if rng is not None and dropout > 0:
            raise MMDiTError("LoRA dropout needs the unmerged form (merged=False)")
        return model.apply(merge(params, loras, scales), latents, sigma, context, pooled, guidance,
                           remat=remat, references=references)
    if not 0.0 <= dropout < 1.0:
        raise MMDiTError(f"LoRA dropout {dropout!r} must be in [0, 1)")
    drop = rng is not None and dropout > 0
    keys = _keys(loras)
    aug = dict(params)
    spec = []
    for i, key in enumerate(keys):
        node = _copy_path(aug, tree_path(key))
        matrix = _matrix_shape(loras, key, node["kernel"].shape)
        a, b, c = factors(loras, scales, key, matrix)
        node.update(lora_a=a, lora_b=b, lora_scale=c)
        if drop:
            k = jax.random.fold_in(_as_key(rng), i)
            lead = matrix[:-2]
            k = jax.random.split(k, lead[0]) if lead else k
            node["lora_key"] = jax.random.key_data(k)
        spec.append((key, a.shape[-1], jnp.dtype(a.dtype).name, drop))
    structure = _structure(model.config, model.dtype, tuple(spec), float(dropout) if drop else 0.0,
                           getattr(model, "quantize", None))
    module = structure.module(aug)
    kw = {}
    if references is not None:
        if "references" not in inspect.signature(type(module).__call__).parameters:
            raise MMDiTError(f"references are supported for FLUX.2 models, not {model.config.family}")
        kw["references"] = list(references)
    return module(latents, sigma, context, pooled, guidance, remat=remat, **kw)
