"""Hand-written derivatives (LayerNorm, GELU-tanh, attention backward) against autodiff of the plain
formulas, and the adaLN hoisting out of the block scan. Model-level gradients against torch autograd
are in test_sd3_model.py / test_flux_grad.py; attention gradients against torch in test_attention.py."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

import mmdit_jax as mj
from mmdit_jax.layers import gelu_tanh, layer_norm

attn_mod = importlib.import_module("mmdit_jax.attention")  # the package exports a function of that name


def _plain_layer_norm(x, eps=1e-6):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _plain_gelu(x):
    return jax.nn.gelu(x, approximate=True)


def _x(shape=(2, 5, 24), seed=0, dtype=jnp.float32, scale=3.0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.standard_normal(shape) * scale + 0.5, dtype)


@pytest.mark.parametrize("fn,plain", [(layer_norm, _plain_layer_norm), (gelu_tanh, _plain_gelu)],
                         ids=["layer_norm", "gelu_tanh"])
def test_float32_values_vjp_and_jvp_match_autodiff(fn, plain):
    x, ct, tan = _x(seed=0), _x(seed=1, scale=1.0), _x(seed=2, scale=1.0)
    np.testing.assert_array_equal(np.asarray(fn(x)), np.asarray(plain(x)))  # same forward, bit for bit
    (g,) = jax.vjp(fn, x)[1](ct)
    (g_ref,) = jax.vjp(plain, x)[1](ct)
    assert max_rel_err(g, g_ref) < 1e-5
    _, t = jax.jvp(fn, (x,), (tan,))  # forward mode works (custom_jvp, not custom_vjp)
    _, t_ref = jax.jvp(plain, (x,), (tan,))
    assert max_rel_err(t, t_ref) < 1e-5
    # second order too: the written derivative is itself differentiable
    hv = jax.grad(lambda y: jnp.sum(jax.grad(lambda z: jnp.sum(fn(z) * ct))(y) * tan))(x)
    hv_ref = jax.grad(lambda y: jnp.sum(jax.grad(lambda z: jnp.sum(plain(z) * ct))(y) * tan))(x)
    assert max_rel_err(hv, hv_ref) < 1e-4


@pytest.mark.parametrize("fn,plain", [(layer_norm, _plain_layer_norm), (gelu_tanh, _plain_gelu)],
                         ids=["layer_norm", "gelu_tanh"])
def test_bfloat16_gradients_follow_the_float32_ones(fn, plain):
    """bf16 in, bf16 out; statistics and the derivative in float32, rounded once at the end."""
    x, ct = _x(seed=3, dtype=jnp.bfloat16), _x(seed=4, scale=1.0, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(fn(x), np.float32), np.asarray(plain(x), np.float32))
    (g,) = jax.vjp(fn, x)[1](ct)
    assert g.dtype == jnp.bfloat16
    (g32,) = jax.vjp(plain, x.astype(jnp.float32))[1](ct.astype(jnp.float32))
    assert max_rel_err(np.asarray(g, np.float32), g32) < 1e-2


def test_attention_backward_matches_autodiff_of_the_plain_softmax():
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((2, n, 3, 8)), jnp.float32) for n in (13, 21, 21))
    ct = jnp.asarray(r.standard_normal((2, 13, 3, 8)), jnp.float32)

    def plain(q, k, v):
        return attn_mod._xla(q, k, v, None, False, 0.3)

    def ours(q, k, v):
        return mj.attention(q, k, v, scale=0.3, backend="xla")

    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(plain(q, k, v)), rtol=1e-6, atol=1e-6)
    g = jax.vjp(ours, q, k, v)[1](ct)
    g_ref = jax.vjp(plain, q, k, v)[1](ct)
    for a, b in zip(g, g_ref):
        assert max_rel_err(a, b) < 1e-5
    # under jit and vmap too (the sampler and trainer trace it inside both)
    gj = jax.jit(jax.vmap(jax.grad(lambda *a: jnp.sum(ours(*a)[None] * ct[:1]), argnums=(0, 1, 2))))(
        q[:, None], k[:, None], v[:, None])
    gj_ref = jax.vmap(jax.grad(lambda *a: jnp.sum(plain(*a)[None] * ct[:1]), argnums=(0, 1, 2)))(
        q[:, None], k[:, None], v[:, None])
    for a, b in zip(gj, gj_ref):
        assert max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_adaln_kernels_are_applied_outside_the_block_scan(family):
    """Stack(cond=...) computes every layer's modulation before the scan: the stacked adaLN kernels
    never enter it (as scan operands), while the blocks' other stacked kernels do."""
    if family == "sd3":
        from mmdit_jax.sd3.config import MMDiTConfig
        cfg = MMDiTConfig(num_layers=3, num_heads=2, head_dim=16, in_channels=4, out_channels=4,
                          context_dim=16, pooled_dim=8, pos_embed_max_size=8, sample_size=8)
        x = (jnp.zeros((2, 8, 6, 4)), jnp.full((2,), 0.5), jnp.zeros((2, 5, 16)), jnp.zeros((2, 8)))
    else:
        from mmdit_jax.flux.config import FluxConfig
        cfg = FluxConfig(in_channels=16, out_channels=16, num_heads=2, head_dim=16, depth=2, depth_single=3,
                         context_dim=16, pooled_dim=8, axes_dim=(4, 6, 6), guidance_embed=False)
        x = (jnp.zeros((2, 8, 6, 4)), jnp.full((2,), 0.5), jnp.zeros((2, 5, 16)), jnp.zeros((2, 8)))
    tm = mj.Transformer.init(cfg, seed=0)
    paths = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(tm.params)[0]]
    closed = jax.make_jaxpr(lambda p: tm.apply(p, *x))(tm.params)
    by_var = dict(zip(closed.jaxpr.invars, paths))
    scanned = {by_var[v] for e in closed.jaxpr.eqns if e.primitive.name == "scan"
               for v in e.invars if v in by_var}
    mod_kernels = [p for p in paths if "/blocks/" in p and p.endswith("lin/kernel")
                   and ("/mod/" in p or "_mod/" in p or "/modulation/" in p)]
    # sd3: two stacks (the last block is pre-only) x two streams; flux: img/txt (double) + single
    assert len(mod_kernels) == (4 if family == "sd3" else 3), mod_kernels
    assert scanned, "no block scan found at the top level of the jaxpr"
    assert not [p for p in mod_kernels if p in scanned], f"adaLN kernels scanned over: {scanned}"
    assert [p for p in scanned if "qkv" in p or "linear1" in p], scanned
    # and the result is that of the per-block modulation (the diffusers parity tests check it too)
    assert np.isfinite(np.asarray(tm.apply(tm.params, *x))).all()
