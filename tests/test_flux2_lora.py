"""LoRA on FLUX.2: diffusers' Flux2Pipeline.load_lora_weights reads our diffusers-format file and changes
its output as ours changes (unmerged and merged, with references); every layout round-trips bit-exact;
the target table names FLUX.2's modules with their categories."""
import jax
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from flux2_oracle import TINY, inputs, reference, tiny_flux2
from flux_oracle import correctly_rounded_sinusoid
from lora_oracle import randomize, vary_ranks
from mmdit_jax import lora as L

FULL = dict(targets="all", rank=4, alpha=3.0, embedders=True, blocks=(1,), single_blocks=(0,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = tiny_flux2(True, seed=1)
    folder = tmp_path_factory.mktemp("flux2")
    ref.save_pretrained(folder)
    model = mj.load_transformer(folder)
    lora = vary_ranks(randomize(L.init_lora(model.config, L.LoraConfig(**FULL))))
    return ref, folder, model, lora


def test_targets_are_categorised():
    cfg = mj.preset("flux2-klein-4b")
    cats = {t.key: {s.category for s in t.slots} for t in L.targets.targets(cfg)}
    assert cats["double_mod_img.lin"] == cats["single_mod.lin"] == {"mod"}
    assert cats["single_blocks.blocks.linear1"] == {"attn"} and cats["single_blocks.blocks.linear2"] == {"mlp"}
    assert cats["double_blocks.blocks.img_mlp.linear_in"] == {"mlp"}
    assert cats["double_blocks.blocks.txt_attn.qkv"] == {"attn"}


def test_diffusers_loads_our_file(setup, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    ref, folder, model, lora = setup
    path = tmp_path / "flux2_lora.safetensors"
    L.save_lora(lora, path, model, "diffusers")
    theirs = Flux2Transformer2DModel.from_pretrained(folder).eval()
    Flux2Pipeline(transformer=theirs, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                  tokenizer=None).load_lora_weights(str(path))
    args = inputs(np.random.default_rng(2), TINY, 2, 3, 4, 3, True, ((2, 2), (1, 3)))
    with correctly_rounded_sinusoid():
        want, base = reference(theirs, *args), reference(ref, *args)
    lat, sigma, ctx, g, refs = args
    for merged in (False, True):
        f = jax.jit(lambda p, lo: L.apply_lora(model, p, lo, lat, sigma, ctx, None, g, merged=merged,
                                               references=refs))
        err = max_rel_err(np.asarray(f(model.params, lora)), want)
        print(f"FLUX.2 LoRA via diffusers load_lora_weights, merged={merged}: max rel err {err:.2e} "
              f"(LoRA moves the output by {max_rel_err(want, base):.2f})")
        assert err < 2e-5
    assert max_rel_err(want, base) > 1e-2


@pytest.mark.parametrize("fmt", L.FORMATS)
def test_round_trip_is_bit_exact(setup, tmp_path, fmt):
    _, _, model, lora = setup
    path = tmp_path / "lora.safetensors"
    L.save_lora(lora, path, model, fmt)
    back = L.load_lora(path, model)
    assert back.parts == lora.parts and jax.tree.structure(back) == jax.tree.structure(lora)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)))
