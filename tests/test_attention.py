"""The attention switch: every backend computes the same softmax attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err

import mmdit_jax as mj


def _qkv(b=2, lq=37, lk=37, h=3, d=16, seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal((b, l, h, d)).astype(np.float32) for l in (lq, lk, lk)]


def test_xla_matches_torch_sdpa():
    q, k, v = _qkv(lq=21, lk=33)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(t).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).numpy()
    assert max_rel_err(mj.attention(q, k, v, backend="xla"), ref) < 1e-6


@pytest.mark.slow
def test_splash_kernel_matches_xla_in_interpret_mode():
    """The TPU kernel, run through Pallas' interpreter on CPU, with padding to its block size masked."""
    q, k, v = _qkv(b=1, lq=130, lk=130, h=2, d=128)
    ref = mj.attention(q, k, v, backend="xla")
    out = mj.attention(q, k, v, backend="splash")
    assert out.shape == ref.shape
    assert max_rel_err(out, ref) < 1e-5


def test_backend_context_and_unknown_backend():
    q, k, v = _qkv()
    with mj.attention_backend("xla"):
        np.testing.assert_allclose(mj.attention(q, k, v), mj.attention(q, k, v, backend="xla"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        with mj.attention_backend("flash3"):
            pass
    with pytest.raises(ValueError, match="unknown attention backend"):
        mj.attention(q, k, v, backend="nope")


def test_gradients_match_torch_autograd():
    q, k, v = _qkv(lq=9, lk=14)
    cot = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32)
    tq, tk, tv = (torch.tensor(t).transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
    (out * torch.tensor(cot)).sum().backward()
    grads = jax.grad(lambda *a: jnp.sum(mj.attention(*a) * cot), argnums=(0, 1, 2))(q, k, v)
    for g, t in zip(grads, (tq, tk, tv)):
        assert max_rel_err(g, t.grad.transpose(1, 2).numpy()) < 1e-5


def test_bias_causal_and_scale_match_torch():
    q, k, v = _qkv(lq=11, lk=11)
    bias = np.random.default_rng(5).standard_normal((1, 3, 11, 11)).astype(np.float32)
    t = [torch.tensor(a).transpose(1, 2) for a in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=torch.tensor(bias), scale=1.0)
    out = mj.attention(q, k, v, bias=bias, scale=1.0, backend="xla")
    assert max_rel_err(out, ref.transpose(1, 2).numpy()) < 1e-6
    ref = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)
    out = mj.attention(q, k, v, is_causal=True, backend="xla")
    assert max_rel_err(out, ref.transpose(1, 2).numpy()) < 1e-6
