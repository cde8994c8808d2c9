"""Pins FLUX's positional scheme and the final layer's (shift, scale) order against diffusers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmdit_jax as mj
from conftest import max_rel_err
from flux_oracle import TINY, correctly_rounded_sinusoid, inputs, reference, state_dict_numpy, tiny_flux
from mmdit_jax.flux import weights
from mmdit_jax.flux.rope import apply_rope, position_ids, rope_tables
from mmdit_jax.io import rules
from mmdit_jax.transformer import Transformer, abstract_module


def _diffusers_rope(x, n_text, h, w, axes, theta=10000):
    import torch
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    ids = torch.cat([torch.zeros(n_text, 3), img_ids])
    freqs = FluxPosEmbed(theta=theta, axes_dim=list(axes))(ids)
    return ids.numpy(), apply_rotary_emb(torch.from_numpy(x), freqs, sequence_dim=1).numpy()


@pytest.mark.parametrize("n_text,h,w", [(4, 8, 12), (1, 6, 3)])
def test_rope_matches_diffusers(n_text, h, w):
    """Full-size FLUX head (axes 16/56/56, positions up to 11): ids and rotated q/k."""
    x = np.random.default_rng(0).standard_normal((2, n_text + h * w, 3, 128)).astype(np.float32)
    ids, want = _diffusers_rope(x, n_text, h, w, (16, 56, 56))
    np.testing.assert_array_equal(np.asarray(position_ids(n_text, h, w)), ids)
    got = np.asarray(jax.jit(lambda x: apply_rope(x, *rope_tables(n_text, h, w, (16, 56, 56))))(x))
    assert max_rel_err(got, want) < 1e-5
    # the known bug (theta 1000) and a half-split rotation (rotate_half style) are both caught
    wrong_theta = np.asarray(apply_rope(x, *rope_tables(n_text, h, w, (16, 56, 56), theta=1000)))
    assert max_rel_err(wrong_theta, want) > 1e-2
    cos, sin = rope_tables(n_text, h, w, (16, 56, 56))
    # rotating pairs (k, k + 64) instead = adjacent rotation of channels permuted to sit side by side
    halves = x.reshape(2, -1, 3, 2, 64).swapaxes(-1, -2).reshape(x.shape)
    half_split = np.asarray(apply_rope(jnp.asarray(halves), cos, sin)).reshape(2, -1, 3, 64, 2)
    assert max_rel_err(half_split.swapaxes(-1, -2).reshape(x.shape), want) > 1e-2


def test_rope_stays_float32_for_bfloat16_inputs():
    x = jnp.ones((1, 5, 2, 32), jnp.bfloat16)
    cos, sin = rope_tables(1, 2, 2, (4, 14, 14))
    assert cos.dtype == jnp.float32 and apply_rope(x, cos, sin).dtype == jnp.bfloat16


def test_final_layer_shift_scale_order(tmp_path):
    """diffusers stores the final adaLN as (scale, shift): loading without the swap must disagree."""
    ref = tiny_flux(False, seed=5)
    ref.save_pretrained(tmp_path)
    model = mj.load_transformer(tmp_path)
    args = inputs(np.random.default_rng(2), TINY, 2, 4, 6, 5, False)
    with correctly_rounded_sinusoid():
        want = reference(ref, *args)
    assert max_rel_err(np.asarray(model(*args)), want) < 1e-5

    plan = [dataclasses.replace(e, rule=dataclasses.replace(e.rule, swapped_in=())) for e in
            weights.plan(model.config)]
    assert plan != weights.plan(model.config)  # the swap is declared somewhere, and only removed here
    template = nnx.split(abstract_module(model.config))[1].to_pure_dict()
    params = rules.import_params(plan, state_dict_numpy(ref), "diffusers", template, "test",
                                 lambda a, _: jnp.asarray(a))
    unswapped = Transformer(model.config, params)
    assert max_rel_err(np.asarray(unswapped(*args)), want) > 1e-2
