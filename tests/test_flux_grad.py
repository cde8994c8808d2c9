"""Gradients of the FLUX transformer vs torch autograd through diffusers' FluxTransformer2DModel."""
import jax
import jax.numpy as jnp
import numpy as np

import mmdit_jax as mj
from conftest import max_rel_err
from flux_oracle import TINY, correctly_rounded_sinusoid, inputs, tiny_flux, torch_forward


def test_gradients_match_torch(tmp_path):
    """d/d(latents) and d/d(a few params) of sum(out * cotangent), JAX vs torch autograd."""
    import torch

    # one block of each kind: the scan body is the same, and the backward compile is what costs here
    ref = tiny_flux(True, seed=4, num_layers=1, num_single_layers=1)
    ref.save_pretrained(tmp_path)
    model = mj.load_transformer(tmp_path)
    rng = np.random.default_rng(7)
    args = inputs(rng, TINY, 2, 4, 6, 3, True)
    cot = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)

    tensors = [torch.tensor(a, requires_grad=(i == 0)) for i, a in enumerate(args)]
    with correctly_rounded_sinusoid():
        (torch_forward(ref, *tensors) * torch.from_numpy(cot)).sum().backward()
    named = dict(ref.named_parameters())

    def loss(params, latents):
        return jnp.sum(model.apply(params, latents, *args[1:]) * cot)

    g_params, g_lat = jax.jit(jax.grad(loss, argnums=(0, 1)))(model.params, args[0])
    err = max_rel_err(g_lat, tensors[0].grad.numpy())
    print(f"grad latents: max rel err {err:.2e}")
    assert err < 1e-5
    # internal kernels are (in, out) = torch weight transposed; stacked blocks carry a leading layer axis;
    # linear2 keeps its input in chunks (1 + m, d, out): the plain matrix is its reshape
    linear2 = g_params["single_blocks"]["blocks"]["linear2"]["kernel"][0]
    checks = [
        (g_params["img_in"]["kernel"].T, "x_embedder.weight"),
        (g_params["guidance_in"]["in_layer"]["kernel"].T, "time_text_embed.guidance_embedder.linear_1.weight"),
        (g_params["double_blocks"]["blocks"]["txt_attn"]["q_norm"]["scale"][0],
         "transformer_blocks.0.attn.norm_added_q.weight"),
        (linear2.reshape(-1, linear2.shape[-1]).T,
         "single_transformer_blocks.0.proj_out.weight"),
        (g_params["final_layer"]["linear"]["bias"], "proj_out.bias"),
    ]
    for got, name in checks:
        err = max_rel_err(got, named[name].grad.numpy())
        print(f"grad {name}: max rel err {err:.2e}")
        assert err < 1e-5, (name, err)
