"""Every remat policy leaves the gradients of both families unchanged, and is the policy the block scan
is checkpointed with (tiny random models, every weight non-zero)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

import mmdit_jax as mj
from mmdit_jax.stacking import REMAT_POLICIES

POLICIES = sorted(p for p in REMAT_POLICIES if p != "none")


def _randomised(cfg, seed):
    r = np.random.default_rng(seed)
    tm = mj.Transformer.init(cfg, seed=seed)
    return tm, jax.tree.map(lambda x: (x + 0.1 * r.standard_normal(x.shape)).astype(x.dtype), tm.params)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request):
    """(jitted grad(params, policy), params, the trained leaves' gradients without remat, trainable mask)."""
    r = np.random.default_rng(1)
    if request.param == "sd3":
        cfg = mj.MMDiTConfig(num_layers=3, num_heads=2, head_dim=8, in_channels=4, out_channels=4, context_dim=12,
                             pooled_dim=6, pos_embed_max_size=8, sample_size=8, qk_norm=True,
                             dual_attention_layers=(1,))
        x = (r.standard_normal((2, 4, 6, 4)), np.array([0.3, 0.8]), r.standard_normal((2, 5, 12)),
             r.standard_normal((2, 6)))
        guidance = None
    else:
        from mmdit_jax.flux.config import FluxConfig
        cfg = FluxConfig(in_channels=16, out_channels=16, num_heads=2, head_dim=16, depth=2, depth_single=2,
                         context_dim=12, pooled_dim=6, axes_dim=(4, 6, 6), guidance_embed=True)
        x = (r.standard_normal((2, 4, 6, 4)), np.array([0.3, 0.8]), r.standard_normal((2, 5, 12)),
             r.standard_normal((2, 6)))
        guidance = np.array([2.0, 4.0], np.float32)
    x = tuple(jnp.asarray(a, jnp.float32) for a in x)
    tm, params = _randomised(cfg, 0)

    def loss(p, remat):
        return jnp.sum(jnp.cos(tm.apply(p, *x, guidance, remat=remat)))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    base = grad.trace(params, "none")
    assert not _checkpoint_policies(base.jaxpr.jaxpr)
    trainable = [g for g, t in zip(jax.tree.leaves(base.lower().compile()(params)),
                                   jax.tree.leaves(tm.trainable_mask())) if t]
    # SD3's last (context pre-only) block: its context queries feed nothing, so their norm has no gradient
    assert sum(float(jnp.abs(g).max()) == 0 for g in trainable) == (1 if request.param == "sd3" else 0)
    return grad, params, trainable, tm.trainable_mask()


def _checkpoint_policies(jaxpr):
    """The policies of every checkpoint (remat) equation, at any depth of the jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            found.append(eqn.params.get("policy"))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _checkpoint_policies(inner)
    return found


@pytest.mark.parametrize("policy", POLICIES)
def test_remat_policy_keeps_the_gradients(family, policy):
    grad, params, base, mask = family
    traced = grad.trace(params, policy)
    policies = _checkpoint_policies(traced.jaxpr.jaxpr)
    assert policies and all(p is REMAT_POLICIES[policy] for p in policies), (policy, policies)
    got = [g for g, t in zip(jax.tree.leaves(traced.lower().compile()(params)), jax.tree.leaves(mask)) if t]
    errs = [max_rel_err(a, b) for a, b in zip(got, base)]
    print(f"remat {policy}: max rel err over {len(errs)} gradients {max(errs):.1e}")
    assert max(errs) < 5e-6  # measured 4.4e-7


def test_unknown_remat_policy_is_refused(family):
    grad, params, _, _ = family
    with pytest.raises(ValueError, match="unknown remat policy"):
        grad.trace(params, "bogus")
