"""Scaled dot-product attention behind one switch, so kernels can be swapped without touching models.

Layout everywhere: q, k, v are (B, L, H, D). Backends:
- "xla": plain XLA (softmax in float32); the CPU path and the reference for the others.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA GPUs;
  needs bfloat16/float16 inputs).
- "splash": TPU Pallas splash attention (also runs in Pallas interpret mode, which the tests use on CPU).
- "auto": cudnn on GPU for half-precision inputs, splash on TPU, xla otherwise.

Under an ambient mesh (jax.set_mesh / use_abstract_mesh) with a "sequence" axis of size > 1, attention
is context parallel: each device keeps its slice of the queries and all-gathers K/V over "sequence"
(see `_sequence_parallel`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.sharding import sequence_mesh

BACKENDS = ("auto", "xla", "cudnn", "splash")
_state = threading.local()


def default_backend() -> str:
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def attention_backend(name: str):
    """Select the attention kernel for code traced inside this context."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    prev = default_backend()
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = prev


def _resolve(backend: str, dtype) -> str:
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def attention(q, k, v, *, bias=None, is_causal: bool = False, scale: float | None = None,
              backend: str | None = None):
    """softmax(scale * q k^T + bias [causal mask]) v; returns (B, Lq, H, D).

    scale defaults to 1/sqrt(D) (T5 passes 1.0); bias broadcasts to (B, H, Lq, Lk) (T5's relative
    position bias). The splash kernel takes neither bias nor masks here: such calls use XLA on TPU."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    name = _resolve(backend or default_backend(), q.dtype)
    mesh = sequence_mesh()
    if mesh is not None and bias is None and not is_causal:
        return _sequence_parallel(q, k, v, scale, name, mesh)
    return _dispatch(q, k, v, bias, is_causal, scale, name)


def _dispatch(q, k, v, bias, is_causal, scale, name):
    if name == "splash" and (bias is not None or is_causal):
        name = "xla"
    if name == "xla":
        if bias is None and not is_causal:
            return _xla_lse(q, k, v, scale)
        return _xla(q, k, v, bias, is_causal, scale)
    if name == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal, scale=scale,
                                            implementation="cudnn")
    if name == "splash":
        return _splash(q * scale, k, v, interpret=jax.default_backend() != "tpu")
    raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")


def _xla(q, k, v, bias, is_causal, scale):
    acc = jnp.promote_types(q.dtype, jnp.float32)  # softmax in at least float32
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    if bias is not None:
        logits = logits + bias.astype(acc)
    if is_causal:
        lq, lk = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((lq, lk), bool), lk - lq), logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla_lse(q, k, v, scale):
    """`_xla` without bias or mask, differentiated the way flash attention is: backward keeps q, k, v,
    the output and the (B, H, Lq) log-sum-exp, and recomputes the probabilities with one extra q k^T
    matmul. Autodiff of `_xla` would keep the (B, H, Lq, Lk) probabilities of every block, which is
    quadratic memory and, on CPU, more time moving them than the matmul takes."""
    return _xla_lse_fwd(q, k, v, scale)[0]


def _xla_lse_fwd(q, k, v, scale):
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    e = jnp.exp(logits - top)
    total = e.sum(-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", (e / total).astype(v.dtype), v)
    return out, (q, k, v, out, top + jnp.log(total))


def _xla_lse_bwd(scale, res, g):
    q, k, v, out, lse = res
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=lse.dtype) * scale
    p = jnp.exp(logits - lse)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(v.dtype), g)
    dp = jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=lse.dtype)
    # softmax backward: ds = p (dp - sum_k p dp), and sum_k p dp = <g, out> per query
    delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(lse.dtype), out.astype(lse.dtype))[..., None]
    ds = (p * (dp - delta) * scale).astype(q.dtype)
    return (jnp.einsum("bhqk,bkhd->bqhd", ds, k), jnp.einsum("bhqk,bqhd->bkhd", ds, q), dv)


_xla_lse.defvjp(_xla_lse_fwd, _xla_lse_bwd)


def _sequence_parallel(q, k, v, scale, name, mesh):
    """Context-parallel attention: queries stay split over "sequence"; K/V are all-gathered.

    Joint attention concatenates text and image tokens, so the joint length rarely divides by the
    sequence axis: all of q, k, v are padded at the end to a multiple of it, padded keys are masked out
    and padded query rows dropped. The text tokens are simply part of the sharded sequence (no special
    case to get wrong). K/V all-gather costs one full (L, H, D) copy per device, fine up to long
    sequences; a ring would bound it at 2/n of that."""
    n = mesh.shape["sequence"]
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    pad_q, pad_k = (-lq) % n, (-lk) % n
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    if b % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()  # an odd batch (sampling) stays whole on each data-parallel group
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and h % t == 0 else None
    spec = jax.sharding.PartitionSpec(batch_axes or None, "sequence", heads, None)

    def local(q, k, v):
        k = jax.lax.all_gather(k, "sequence", axis=1, tiled=True)
        v = jax.lax.all_gather(v, "sequence", axis=1, tiled=True)
        if not pad_k:
            return _dispatch(q, k, v, None, False, scale, name)
        bias = jnp.where(jnp.arange(lk + pad_k) < lk, 0.0, -1e30).astype(jnp.float32)
        return _xla(q, k, v, bias[None, None, None, :], False, scale)  # masks need the XLA kernel

    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
    return out[:, :lq]


_BLOCK = 128


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, lq: int, lk: int, valid_k: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    # Keys beyond `valid_k` are padding added to reach the kernel's block size: mask them out.
    dense = np.zeros((lq, lk), dtype=np.bool_)
    dense[:, :valid_k] = True
    mask = sm.MultiHeadMask([sm.NumpyMask(dense) for _ in range(heads)])
    block = min(_BLOCK, lq)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash(q, k, v, *, interpret: bool):
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    pad_q, pad_k = (-lq) % _BLOCK, (-lk) % _BLOCK
    # The kernel takes (H, L, D) per example and applies no scale of its own (q comes pre-scaled).
    qt = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(h, lq + pad_q, lk + pad_k, lk, interpret)
    out = jax.vmap(kernel)(qt, kt, vt)
    return out.transpose(0, 2, 1, 3)[:, :lq]
