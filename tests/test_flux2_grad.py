"""Gradients of the FLUX.2 transformer vs torch autograd through diffusers' Flux2Transformer2DModel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from flux2_oracle import TINY, inputs, tiny_flux2, torch_forward
from flux_oracle import correctly_rounded_sinusoid
from mmdit_jax.flux2.config import Flux2Config
from mmdit_jax.stacking import REMAT_POLICIES
from test_remat import _checkpoint_policies


def test_gradients_match_torch(tmp_path):
    """d/d(latents), d/d(a reference) and d/d(a few params) of sum(out * cotangent), JAX vs torch."""
    import torch

    # one block of each kind: the scan body is the same, and the backward compile is what costs here
    ref = tiny_flux2(True, seed=4, num_layers=1, num_single_layers=1)
    ref.save_pretrained(tmp_path)
    model = mj.load_transformer(tmp_path)
    rng = np.random.default_rng(7)
    lat, sigma, ctx, g, refs = inputs(rng, TINY, 2, 3, 4, 3, True, ((2, 3),))
    cot = rng.standard_normal((2, 3, 4, TINY["in_channels"])).astype(np.float32)

    t_lat, t_ref = torch.tensor(lat, requires_grad=True), torch.tensor(refs[0], requires_grad=True)
    with correctly_rounded_sinusoid():
        out = torch_forward(ref, t_lat, torch.from_numpy(sigma), torch.from_numpy(ctx), torch.from_numpy(g),
                            [t_ref])
        (out * torch.from_numpy(cot)).sum().backward()
    named = dict(ref.named_parameters())

    def loss(params, latents, reference):
        return jnp.sum(model.apply(params, latents, sigma, ctx, None, g, references=[reference]) * cot)

    g_params, g_lat, g_ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(model.params, lat, refs[0])
    for got, want, name in ((g_lat, t_lat.grad, "latents"), (g_ref, t_ref.grad, "reference")):
        err = max_rel_err(got, want.numpy())
        print(f"grad {name}: max rel err {err:.2e}")
        assert err < 2e-5, name
    # internal kernels are (in, out) = torch weight transposed; stacked blocks carry a leading layer axis;
    # fused kernels keep chunks on axes of their own: the plain matrix is their reshape
    plain = lambda k, n_in: k.reshape(int(np.prod(k.shape[:n_in])), -1).T
    single = g_params["single_blocks"]["blocks"]
    checks = [
        (g_params["img_in"]["kernel"].T, "x_embedder.weight"),
        (g_params["guidance_in"]["in_layer"]["kernel"].T, "time_guidance_embed.guidance_embedder.linear_1.weight"),
        (g_params["double_mod_txt"]["lin"]["kernel"].T, "double_stream_modulation_txt.linear.weight"),
        (g_params["double_blocks"]["blocks"]["txt_attn"]["q_norm"]["scale"][0],
         "transformer_blocks.0.attn.norm_added_q.weight"),
        (plain(g_params["double_blocks"]["blocks"]["img_mlp"]["linear_in"]["kernel"][0], 1),
         "transformer_blocks.0.ff.linear_in.weight"),
        (plain(single["linear1"]["kernel"][0], 1), "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"),
        (plain(single["linear2"]["kernel"][0], 2), "single_transformer_blocks.0.attn.to_out.weight"),
        (g_params["final_layer"]["linear"]["kernel"].T, "proj_out.weight"),
    ]
    for got, name in checks:
        err = max_rel_err(got, named[name].grad.numpy())
        print(f"grad {name}: max rel err {err:.2e}")
        assert err < 2e-5, (name, err)


@pytest.fixture(scope="module")
def remat_case():
    """(jitted grad(params, policy), random params, gradients without remat)."""
    cfg = Flux2Config(in_channels=12, out_channels=12, num_heads=2, head_dim=16, depth=2, depth_single=2,
                      context_dim=20, axes_dim=(4, 4, 4, 4), time_channels=32, guidance_embed=True)
    tm = mj.Transformer.init(cfg, seed=0)
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (x + 0.1 * r.standard_normal(x.shape)).astype(x.dtype), tm.params)
    lat, sigma, ctx, g, refs = inputs(r, TINY, 2, 3, 4, 3, True, ((2, 2),))

    def loss(p, remat):
        return jnp.sum(jnp.cos(tm.apply(p, lat, sigma, ctx, None, g, references=refs, remat=remat)))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    base = grad.trace(params, "none")
    assert not _checkpoint_policies(base.jaxpr.jaxpr)
    return grad, params, jax.tree.leaves(base.lower().compile()(params))


@pytest.mark.slow  # one backward compile per policy
@pytest.mark.parametrize("policy", sorted(p for p in REMAT_POLICIES if p != "none"))
def test_remat_policy_keeps_the_gradients(remat_case, policy):
    grad, params, base = remat_case
    traced = grad.trace(params, policy)
    policies = _checkpoint_policies(traced.jaxpr.jaxpr)
    assert policies and all(p is REMAT_POLICIES[policy] for p in policies), (policy, policies)
    errs = [max_rel_err(a, b) for a, b in zip(jax.tree.leaves(traced.lower().compile()(params)), base)]
    print(f"remat {policy}: max rel err over {len(errs)} gradients {max(errs):.1e}")
    assert max(errs) < 5e-6
