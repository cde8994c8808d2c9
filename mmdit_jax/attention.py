"""Scaled dot-product attention behind one switch, so kernels can be swapped without touching models.

Layout everywhere: q, k, v are (B, L, H, D). Backends:
- "xla": plain XLA (softmax in float32); the CPU path and the reference for the others. Without bias or
  mask it is differentiated like flash attention (only the log-sum-exp is kept for backward), and when
  one (B, H, Lq, Lk) float32 logits array would exceed `AttentionConfig.chunk_threshold` bytes it runs
  over query chunks, forward and backward, so memory stays linear in L per chunk (with a bias or causal
  mask, autodiff through the chunked forward).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA GPUs;
  needs bfloat16/float16 inputs).
- "splash": TPU Pallas splash attention (also runs in Pallas interpret mode, which the tests use on CPU):
  a full mask with segment ids for padded keys, `AttentionConfig` block sizes, fused backward. Mosaic
  kernels cannot be partitioned by XLA, so under any ambient multi-device mesh it always runs inside a
  `shard_map` over batch ("data", "fsdp") and heads ("tensor").
- "auto": cudnn on GPU for half-precision inputs, splash on TPU, xla otherwise.

Under an ambient mesh (jax.set_mesh / use_abstract_mesh) with a "sequence" axis of size > 1, attention
is context parallel: each device keeps its slice of the queries and all-gathers K/V over "sequence"
(see `_sharded`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.sharding import ambient_mesh

BACKENDS = ("auto", "xla", "cudnn", "splash")
# checkpoint name of the softmax statistics the kernels keep for backward (the remat policies in
# stacking.py save it, so backward never recomputes q k^T and exp)
LSE_NAME = "attn_lse"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Kernel tuning; results change only by float rounding.

    splash_block_*: splash tiles for the forward and the fused backward, clipped to the sequence
    (rounded up to 128) for short ones. 512 rather than the kernel's 128 placeholder
    (`BlockSizes.get_default` carries a TODO to pick better ones): larger tiles amortise the per-step
    overhead of the grid on TPU, and 512 is MaxText's default for this kernel
    (benchmarks/attention_kernels.py measures the alternatives on a TPU).
    chunk_threshold: the XLA kernel goes over query chunks when one (B, H, Lq, Lk) logits array would
    take more bytes than this; chunk_bytes: the logits bytes of one chunk then."""
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    chunk_threshold: int = 256 << 20
    chunk_bytes: int = 64 << 20

    def __post_init__(self):
        for f in ("splash_block_q", "splash_block_kv", "splash_block_kv_compute"):
            size = getattr(self, f)
            if size <= 0 or size % 128:
                raise ValueError(f"AttentionConfig.{f} must be a positive multiple of 128, got {size}")
        if self.splash_block_kv % self.splash_block_kv_compute:
            raise ValueError(f"AttentionConfig.splash_block_kv_compute ({self.splash_block_kv_compute}) must "
                             f"divide splash_block_kv ({self.splash_block_kv})")
        if self.chunk_threshold < 0 or self.chunk_bytes <= 0:
            raise ValueError(f"AttentionConfig.chunk_threshold must be >= 0 and chunk_bytes > 0, got "
                             f"{self.chunk_threshold} and {self.chunk_bytes}")


# Both settings are part of jit's cache key: a function jitted once and called again under another
# backend or tuning is traced again rather than reusing the other kernel.
_BACKEND = jax.make_user_context("auto")
_CONFIG = jax.make_user_context(AttentionConfig())


def default_backend() -> str:
    return _BACKEND.value


def current_config() -> AttentionConfig:
    return _CONFIG.value


@contextlib.contextmanager
def attention_backend(name: str):
    """Select the attention kernel for code traced inside this context."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    with _BACKEND(name):
        yield


@contextlib.contextmanager
def attention_config(config: AttentionConfig):
    """Tune the kernels (block sizes, chunking) for code traced inside this context."""
    if not isinstance(config, AttentionConfig):
        raise TypeError(f"attention_config takes an AttentionConfig, got {type(config).__name__}")
    with _CONFIG(config):
        yield


def _resolve(backend: str, dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
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
    if bias is not None or is_causal:
        if name == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal, scale=scale,
                                                implementation="cudnn")
        return _xla(q, k, v, bias, is_causal, scale)
    mesh = ambient_mesh()
    if mesh is not None and (name == "splash" or mesh.shape.get("sequence", 1) > 1):
        return _sharded(q, k, v, scale, name, mesh)
    return _local(q, k, v, scale, name, None)


def _local(q, k, v, scale, name, valid_k):
    """Attention on one device's arrays; keys from `valid_k` on (None: none) are padding."""
    if name == "xla":
        return _xla_lse(q, k, v, scale, valid_k, _query_chunks(q, k))
    if name == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, **cudnn_padding(q.shape[0], valid_k))
    return _splash(q * scale, k, v, valid_k, interpret=jax.default_backend() != "tpu")


def cudnn_padding(batch: int, valid_k):
    """Keyword arguments of the cuDNN call: padded keys are cut by sequence length, which keeps the
    flash kernel (a bias would not)."""
    if valid_k is None:
        return dict(implementation="cudnn")
    return dict(implementation="cudnn", key_value_seq_lengths=jnp.full((batch,), valid_k, jnp.int32))


def _xla(q, k, v, bias, is_causal, scale):
    """Attention with an additive bias and/or a causal mask, differentiated by autodiff. Above the chunk
    threshold the forward goes over query chunks (inference memory linear in L per chunk)."""
    chunks = _query_chunks(q, k)
    if chunks == 1:
        return _xla_rows(q, k, v, bias, is_causal, scale, 0, q.shape[1])
    lq = q.shape[1]
    size = -(-lq // chunks)
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - jnp.ndim(bias)) + jnp.shape(bias))
        bias = _chunks(bias, 2, chunks) if bias.shape[2] > 1 else jnp.broadcast_to(bias, (chunks,) + bias.shape)
    out = jax.lax.map(lambda xs: _xla_rows(xs[0], k, v, xs[1], is_causal, scale, xs[2], lq),
                      (_chunks(q, 1, chunks), bias, jnp.arange(chunks) * size))
    return _unchunk(out, 1, lq)


def _xla_rows(q, k, v, bias, is_causal, scale, first, lq):
    """`_xla` for the query rows first .. first + len(q) of `lq`."""
    acc = jnp.promote_types(q.dtype, jnp.float32)  # softmax in at least float32
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    if bias is not None:
        logits = logits + bias.astype(acc)
    if is_causal:
        rows = first + jnp.arange(q.shape[1]) + (k.shape[1] - lq)
        logits = jnp.where(rows[:, None] >= jnp.arange(k.shape[1]), logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _query_chunks(q, k) -> int:
    """How many query chunks the XLA kernel uses: 1 up to `chunk_threshold` bytes of logits."""
    cfg = current_config()
    b, lq, h, _ = q.shape
    nbytes = b * h * lq * k.shape[1] * jnp.dtype(jnp.promote_types(q.dtype, jnp.float32)).itemsize
    if nbytes <= cfg.chunk_threshold:
        return 1
    return min(lq, -(-nbytes // cfg.chunk_bytes))


def _chunks(x, axis: int, n: int):
    """`x` cut along `axis` into n equal chunks (zero-padded at the end), stacked on a new leading axis."""
    size = -(-x.shape[axis] // n)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * size - x.shape[axis])
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:]), axis, 0)


def _unchunk(x, axis: int, length: int):
    """Inverse of `_chunks`: (n, ...) chunks joined back along `axis`, cut to `length`."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _logits(q, k, scale, valid_k, acc):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    if valid_k is not None:
        logits = jnp.where(jnp.arange(k.shape[1]) < valid_k, logits, -jnp.inf)
    return logits


def _fwd_rows(q, k, v, scale, valid_k):
    """Output and (B, H, Lq, 1) log-sum-exp for a set of query rows."""
    logits = _logits(q, k, scale, valid_k, jnp.promote_types(q.dtype, jnp.float32))
    top = logits.max(-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = e.sum(-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", (e / total).astype(v.dtype), v), top + jnp.log(total)


def _bwd_rows(q, k, v, lse, g, scale, valid_k):
    """(dq, dk, dv) contributions of a set of query rows; dk, dv in the softmax dtype for summing."""
    acc = lse.dtype
    p = jnp.exp(_logits(q, k, scale, valid_k, acc) - lse)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(v.dtype), g, preferred_element_type=acc)
    dp = jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=acc)
    # softmax backward: ds = p (dp - sum_k p dp); the sum comes from p and dp, so the output itself
    # is no residual
    ds = (p * (dp - (p * dp).sum(-1, keepdims=True)) * scale).astype(q.dtype)
    return (jnp.einsum("bhqk,bkhd->bqhd", ds, k), jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=acc),
            dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _xla_lse(q, k, v, scale, valid_k, chunks):
    """Unbiased attention differentiated the way flash attention is: backward keeps q, k, v and the
    (B, H, Lq) log-sum-exp and recomputes the probabilities with one extra q k^T matmul. Autodiff would
    keep the (B, H, Lq, Lk) probabilities of every block: quadratic memory and, on CPU, more time moving
    them than the matmul takes. Keys from `valid_k` on are masked out; `chunks` > 1 maps both passes over
    that many query chunks."""
    return _xla_lse_fwd(q, k, v, scale, valid_k, chunks)[0]


def _xla_lse_fwd(q, k, v, scale, valid_k, chunks):
    if chunks == 1:
        out, lse = _fwd_rows(q, k, v, scale, valid_k)
    else:
        out, lse = jax.lax.map(lambda qc: _fwd_rows(qc, k, v, scale, valid_k), _chunks(q, 1, chunks))
        out, lse = _unchunk(out, 1, q.shape[1]), _unchunk(lse, 2, q.shape[1])
    return out, (q, k, v, checkpoint_name(lse, LSE_NAME))


def _xla_lse_bwd(scale, valid_k, chunks, res, g):
    q, k, v, lse = res
    if chunks == 1:
        dq, dk, dv = _bwd_rows(q, k, v, lse, g, scale, valid_k)
        return dq, dk.astype(k.dtype), dv.astype(v.dtype)

    def body(carry, xs):
        dq, dk, dv = _bwd_rows(*xs[:1], k, v, *xs[1:], scale, valid_k)
        return (carry[0] + dk, carry[1] + dv), dq

    zero = jnp.zeros(k.shape, lse.dtype), jnp.zeros(v.shape, lse.dtype)
    xs = (_chunks(q, 1, chunks), _chunks(lse, 2, chunks), _chunks(g, 1, chunks))
    (dk, dv), dq = jax.lax.scan(body, zero, xs)
    return _unchunk(dq, 1, q.shape[1]), dk.astype(k.dtype), dv.astype(v.dtype)


_xla_lse.defvjp(_xla_lse_fwd, _xla_lse_bwd)


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The data-parallel mesh axes the batch splits over: all of them when they divide it, else the
    first that does (an odd sampling batch stays whole on each data-parallel group)."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    for cand in (axes,) + tuple((a,) for a in axes):
        if cand and batch % math.prod(mesh.shape[a] for a in cand) == 0:
            return cand
    return ()


def _sharded(q, k, v, scale, name, mesh):
    """Attention in a `shard_map` over the ambient mesh: batch over ("data", "fsdp"), heads over "tensor",
    and with a "sequence" axis context parallel: queries stay split over it and K/V are all-gathered.

    Joint attention concatenates text and image tokens, so the joint length rarely divides by the
    sequence axis: all of q, k, v are padded at the end to a multiple of it, padded keys are masked out
    inside each kernel (segment ids, sequence lengths, a masked XLA softmax) and padded query rows
    dropped. The text tokens are simply part of the sharded sequence (no special case to get wrong).
    K/V all-gather costs one full (L, H, D) copy per device, fine up to long sequences; a ring would
    bound it at 2/n of that."""
    n = mesh.shape.get("sequence", 1)
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    pad_q, pad_k = (-lq) % n, (-lk) % n
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and h % t == 0 else None
    spec = jax.sharding.PartitionSpec(_batch_axes(mesh, b) or None, "sequence" if n > 1 else None, heads, None)

    def local(q, k, v):
        if n > 1:
            k = jax.lax.all_gather(k, "sequence", axis=1, tiled=True)
            v = jax.lax.all_gather(v, "sequence", axis=1, tiled=True)
        return _local(q, k, v, scale, name, lk if pad_k else None)

    # the Pallas (splash) call declares no varying-manual-axes types for its outputs
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                        check_vma=name != "splash")(q, k, v)
    return out[:, :lq]


def splash_blocks(lq: int, lk: int, cfg: AttentionConfig | None = None) -> tuple[int, int, int]:
    """(block_q, block_kv, block_kv_compute) for these lengths: the configured sizes, clipped to the
    lengths rounded up to the kernel's 128 granule."""
    cfg = cfg or current_config()
    bq = min(cfg.splash_block_q, -(-lq // 128) * 128)
    bkv = min(cfg.splash_block_kv, -(-lk // 128) * 128)
    bkc = cfg.splash_block_kv_compute if bkv % cfg.splash_block_kv_compute == 0 else bkv
    return bq, bkv, bkc


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, lq: int, lk: int, blocks: tuple[int, int, int], interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bkv, bkc = blocks
    # a lazy full mask: its block tables are built tile by tile, never as an (lq, lk) array; padded keys
    # are cut by segment ids at call time
    mask = sm.MultiHeadMask([sm.FullMask((lq, lk))] * heads)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkc, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkc, use_fused_bwd_kernel=True)
    # The kernel holds its block tables as arrays. Built inside a trace they would be tracers, and the
    # cached kernel would leak them into every later trace (the next scan, the next jit); as device
    # arrays made inside one shard_map they would carry that mesh into the next. Host arrays are
    # constants in any trace.
    with jax.ensure_compile_time_eval():
        kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    residual_checkpoint_name=LSE_NAME, interpret=interpret)
    return jax.tree.map(np.asarray, kernel)


def _splash(q, k, v, valid_k, *, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, lq, h, _ = q.shape
    lk = k.shape[1]
    valid_k = lk if valid_k is None else valid_k
    blocks = splash_blocks(lq, lk)
    pad_q, pad_k = (-lq) % blocks[0], (-lk) % blocks[1]
    # The kernel takes (H, L, D) per example and applies no scale of its own (q comes pre-scaled).
    qt = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(h, lq + pad_q, lk + pad_k, blocks, interpret)
    segments = None
    if valid_k < lk + pad_k:  # padded keys in segment 1, which no query (padded ones included) is in
        segments = SegmentIds(q=jnp.zeros((lq + pad_q,), jnp.int32),
                              kv=(jnp.arange(lk + pad_k) >= valid_k).astype(jnp.int32))
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(qt, kt, vt)
    return out.transpose(0, 2, 1, 3)[:, :lq]
