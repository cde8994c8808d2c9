"""The accelerator kernels' paths checked on CPU: splash (Pallas interpret mode) under jit in whole models,
its masks and block sizes, padded keys masked inside the memory-lean kernels, query-chunked XLA attention
and the remat policies keeping the log-sum-exp."""
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

import mmdit_jax as mj
from mmdit_jax.attention import (AttentionConfig, _splash_kernel, _xla_lse, attention, attention_backend,
                                 attention_config, cudnn_padding, splash_blocks)

TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=16, num_layers=1,
                 num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                 pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_SD3 = mj.MMDiTConfig(num_layers=3, num_heads=2, head_dim=16, context_dim=12, pooled_dim=10, in_channels=4,
                          out_channels=4, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))


def walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (pjit, scan, remat, custom_vjp,
    shard_map, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from walk(sub)


def _model(family):
    cfg = mj.FluxConfig.from_diffusers(TINY_FLUX) if family == "flux" else TINY_SD3
    tm = mj.Transformer.init(cfg, seed=0)
    # the zero-initialised adaLN and output layers perturbed, so every weight matters
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), tm.params)
    r = np.random.default_rng(0)
    x = [r.standard_normal((2, 8, 12, 4), np.float32), np.array([0.3, 0.8], np.float32),
         r.standard_normal((2, 5, 12), np.float32), r.standard_normal((2, 10), np.float32)]
    if family == "flux":
        x.append(np.full((2,), 3.0, np.float32))
    return tm, params, x


def _qkv(b=2, lq=37, lk=37, h=3, d=16, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal((b, n, h, d)).astype(np.float32)) for n in (lq, lk, lk)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_splash_under_jit_matches_xla_in_whole_models(family):
    """Jitted forward and gradient through scanned blocks (FLUX: double then single stack; SD3: groups),
    then a second jit reusing the cached kernel: the kernel is built at compile time, so no tracer of one
    trace reaches the next."""
    tm, params, x = _model(family)

    def loss(p, *x):
        return jnp.sum(jnp.sin(tm.apply(p, *x)))

    got = {}
    for backend in ("xla", "splash"):
        with attention_backend(backend):
            got[backend] = jax.jit(lambda p, *x: (tm.apply(p, *x), jax.grad(loss)(p, *x)))(params, *x)
            again = jax.jit(tm.apply)(params, *x)
        np.testing.assert_array_equal(again, got[backend][0])
    assert max_rel_err(got["splash"][0], got["xla"][0]) < 1e-5
    for g, ref in zip(jax.tree.leaves(got["splash"][1]), jax.tree.leaves(got["xla"][1])):
        assert max_rel_err(g, ref) < 1e-4


def test_splash_kernel_at_flux_1024_needs_no_dense_mask():
    """FLUX at 1024x1024: 4608 joint tokens, 24 heads of 128. The kernel is traced with a lazy full mask
    (tile by tile), the tuned block sizes and the fused backward: building it allocates far less than one
    dense (L, L) boolean mask."""
    L, h = 4608, 24
    s = jax.ShapeDtypeStruct((1, L, h, 128), jnp.bfloat16)
    small = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    f = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, backend="splash"))
    f(small, small, small)  # imports and tracing machinery warmed outside the measurement
    _splash_kernel.cache_clear()
    tracemalloc.start()
    f(s, s, s)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < L * L // 4, peak
    assert splash_blocks(L, L) == (512, 512, 512)
    kernel = _splash_kernel(h, L, L, (512, 512, 512), True)
    assert kernel.kwargs["block_sizes"].use_fused_bwd_kernel and kernel.dq_mask_info is None
    assert kernel.fwd_mask_info.partial_mask_blocks is None  # no partial (masked) tiles stored


def test_splash_blocks_clip_to_short_sequences_and_config_validates():
    assert splash_blocks(29, 29) == (128, 128, 128)
    assert splash_blocks(300, 4429) == (384, 512, 512)
    assert splash_blocks(4429, 4429, AttentionConfig(splash_block_q=1024, splash_block_kv=1024,
                                                     splash_block_kv_compute=256)) == (1024, 1024, 256)
    with pytest.raises(ValueError, match="splash_block_q"):
        AttentionConfig(splash_block_q=100)
    with pytest.raises(ValueError, match="splash_block_kv_compute"):
        AttentionConfig(splash_block_kv=512, splash_block_kv_compute=384)


@pytest.mark.slow
def test_splash_masks_padded_keys_with_segment_ids():
    """Keys padded beyond the valid length (the sequence-parallel path pads to the mesh) are cut by
    segment ids; forward and gradient equal attention over the valid keys."""
    from mmdit_jax.attention import _splash

    q, k, v = _qkv(b=1, lq=20, lk=20, h=2, d=16)
    pad = ((0, 0), (0, 6), (0, 0), (0, 0))
    cot = jnp.cos(q)

    def f(q, k, v):
        return jnp.sum(_splash(q * 0.25, jnp.pad(k, pad), jnp.pad(v, pad), 20, interpret=True) * cot)

    def g(q, k, v):
        return jnp.sum(attention(q, k, v, backend="xla") * cot)

    jaxpr = jax.make_jaxpr(f)(q, k, v)
    assert any(e.primitive.name == "pallas_call" for e in walk(jaxpr.jaxpr))
    out, ref = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v), jax.value_and_grad(g, (0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert max_rel_err(a, b) < 1e-5


def test_xla_masks_padded_keys_inside_the_lse_kernel():
    q, k, v = _qkv(lq=21, lk=21)
    pad = ((0, 0), (0, 3), (0, 0), (0, 0))
    cot = jnp.cos(q)
    for chunks in (1, 4):
        def f(q, k, v):
            return jnp.sum(_xla_lse(q, jnp.pad(k, pad), jnp.pad(v, pad), 0.25, 21, chunks) * cot)

        def g(q, k, v):
            return jnp.sum(attention(q, k, v, backend="xla") * cot)

        out, ref = jax.value_and_grad(f, (0, 1, 2))(q, k, v), jax.value_and_grad(g, (0, 1, 2))(q, k, v)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            assert max_rel_err(a, b) < 1e-6, chunks


def test_cudnn_call_cuts_padded_keys_by_sequence_length():
    """cuDNN does not run on CPU: its arguments are checked here, and the same arguments given to
    jax.nn.dot_product_attention's XLA implementation mask the padded keys."""
    q, k, v = _qkv(b=2, lq=13, lk=13, h=2, d=8)
    kw = cudnn_padding(2, 13)
    assert kw["implementation"] == "cudnn" and kw["key_value_seq_lengths"].dtype == jnp.int32
    np.testing.assert_array_equal(kw["key_value_seq_lengths"], [13, 13])
    assert cudnn_padding(2, None) == dict(implementation="cudnn")
    pad = ((0, 0), (0, 3), (0, 0), (0, 0))
    out = jax.nn.dot_product_attention(q, jnp.pad(k, pad), jnp.pad(v, pad), scale=0.25,
                                       **dict(kw, implementation="xla"))
    assert max_rel_err(out, attention(q, k, v, scale=0.25, backend="xla")) < 1e-6


CHUNKED = AttentionConfig(chunk_threshold=0, chunk_bytes=2048)


def test_query_chunked_xla_matches_unchunked():
    """Above the threshold the XLA kernel maps forward and backward over query chunks (odd lengths: the
    last chunk is padded); both equal the one-shot kernel."""
    q, k, v = _qkv(lq=37, lk=29)
    cot = jnp.cos(q)

    def f(q, k, v):
        return jnp.sum(attention(q, k, v, backend="xla") * cot)

    ref = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
    with attention_config(CHUNKED):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
        out = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
    assert sum(e.primitive.name == "scan" for e in walk(jaxpr.jaxpr)) == 2  # the forward map, the backward scan
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert max_rel_err(a, b) < 1e-6
    with pytest.raises(TypeError, match="AttentionConfig"):
        with attention_config({"chunk_bytes": 1}):
            pass


@pytest.mark.parametrize("bias_shape", [None, (1, 3, 37, 37), (2, 1, 1, 37)])
def test_query_chunked_biased_and_causal_attention_matches_unchunked(bias_shape):
    """T5's relative-position bias and CLIP's causal mask: the forward goes over query chunks too."""
    q, k, v = _qkv(lq=37, lk=37)
    bias = None if bias_shape is None else jnp.asarray(np.random.default_rng(1).standard_normal(bias_shape),
                                                       jnp.float32)
    cot = jnp.cos(q)

    def f(q, k, v):
        return jnp.sum(attention(q, k, v, bias=bias, is_causal=bias is None, scale=0.3, backend="xla") * cot)

    ref = jax.value_and_grad(f, (0, 1, 2))(q, k, v)
    with attention_config(CHUNKED):
        assert any(e.primitive.name == "scan" for e in walk(jax.make_jaxpr(f)(q, k, v).jaxpr))
        out = jax.value_and_grad(f, (0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert max_rel_err(a, b) < 1e-6


def test_query_chunked_xla_memory_is_linear_in_length():
    """Compiled temporary memory of forward + backward at 1 x 2 heads x 2048 tokens: one-shot it holds
    (B, H, L, L) float32 arrays; chunked to 1 MiB of logits it stays far below one of them."""
    q = jax.ShapeDtypeStruct((1, 2048, 2, 32), jnp.float32)
    square = 2 * 2048 * 2048 * 4

    def f(q, k, v):
        return jnp.sum(attention(q, k, v, backend="xla"))

    def temp(cfg):
        with attention_config(cfg):
            return jax.jit(jax.grad(f, (0, 1, 2))).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    assert temp(AttentionConfig(chunk_threshold=1 << 62)) >= square
    assert temp(AttentionConfig(chunk_threshold=0, chunk_bytes=1 << 20)) < square / 4


def test_vae_decode_attention_is_chunked_above_the_threshold():
    from mmdit_jax.vae import VAE, VAEConfig

    vae = VAE.init(VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4), seed=0)
    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ref = jax.jit(vae.decode_apply)(vae.params, z)
    with attention_config(AttentionConfig(chunk_threshold=64 * 64 * 4 - 1, chunk_bytes=4096)):
        jaxpr = jax.make_jaxpr(vae.decode_apply)(vae.params, z)
        out = jax.jit(vae.decode_apply)(vae.params, z)
    assert any(e.primitive.name == "scan" for e in walk(jaxpr.jaxpr))
    assert max_rel_err(out, ref) < 1e-6


def _logit_dots(jaxpr, length):
    return sum(e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-2:] == (length, length)
               for e in walk(jaxpr))


def test_remat_policies_keep_the_log_sum_exp():
    """Under the `attn` and `qkv_attn` policies backward reuses the saved log-sum-exp: the gradient has as
    many (L, L) matmuls as without remat (forward q k^T; backward q k^T and g v^T), none of them a rerun of
    the forward. `full` recomputes the forward and shows the count sees it."""
    tm, params, x = _model("flux")
    length = 5 + 4 * 6  # text tokens + 2x2 patches of the 8x12 latent

    def count(policy):
        f = lambda p, *x: jnp.sum(tm.apply(p, *x, remat=policy))  # noqa: E731
        return _logit_dots(jax.make_jaxpr(jax.grad(f))(params, *x).jaxpr, length)

    base = count("none")
    assert base > 0 and count("full") > base
    assert count("attn") == base and count("qkv_attn") == base
