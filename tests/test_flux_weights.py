"""FLUX checkpoint layouts: BFL single files (bare and ComfyUI-prefixed) load to exactly the weights of
the diffusers folder, config detected from shapes; export reproduces both layouts."""
import jax
import numpy as np
import pytest
import safetensors.numpy

import mmdit_jax as mj
from conftest import max_rel_err
from flux_oracle import TINY, correctly_rounded_sinusoid, inputs, reference, state_dict_numpy, tiny_flux, to_bfl
from mmdit_jax.flux import weights
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.io import rules


@pytest.fixture(scope="module")
def ref_and_folder(tmp_path_factory):
    ref = tiny_flux(True, seed=3)
    folder = tmp_path_factory.mktemp("flux_diffusers")
    ref.save_pretrained(folder)
    return ref, folder


def test_bfl_writer_inverts_diffusers_converter(ref_and_folder):
    """diffusers' BFL -> diffusers converter must map our BFL dict back to the state dict exactly.

    The converter hard-codes FLUX.1's widths for splitting single-block linear1 (3072 x 3 + 12288), so
    the single blocks' q/k/v/mlp rows are widened to those sizes here; the writer is shape-agnostic."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    ref, _ = ref_and_folder
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k in list(sd):
        widened = ("to_q", "to_k", "to_v", "proj_mlp")
        if k.startswith("single_transformer_blocks.") and any(n in k for n in widened):
            rows = 12288 if "proj_mlp" in k else 3072
            sd[k] = torch.randn((rows,) + tuple(sd[k].shape[1:]), generator=g)
    bfl = to_bfl(sd)
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in bfl)
    comfy = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    back = convert_flux_transformer_checkpoint_to_diffusers(comfy)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_single_file_loads_same_weights(ref_and_folder, tmp_path, prefix):
    ref, folder = ref_and_folder
    from_folder = mj.load_transformer(folder)
    path = tmp_path / "flux.safetensors"
    safetensors.numpy.save_file({prefix + k: v for k, v in to_bfl(state_dict_numpy(ref)).items()}, str(path))
    model = mj.load_transformer(path)
    assert model.config == from_folder.config == FluxConfig.from_diffusers(dict(ref.config))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), model.params, from_folder.params)
    assert all(jax.tree.leaves(same))
    if prefix:  # one forward pass to tie the file to the oracle directly
        args = inputs(np.random.default_rng(5), TINY, 2, 4, 6, 5, True)
        with correctly_rounded_sinusoid():
            want = reference(ref, *args)
        assert max_rel_err(np.asarray(model(*args)), want) < 1e-5


def test_export_reproduces_both_layouts(ref_and_folder):
    ref, folder = ref_and_folder
    model = mj.load_transformer(folder)
    params = jax.tree.map(np.asarray, model.params)
    plan = weights.plan(model.config)
    sd = state_dict_numpy(ref)
    for layout, want in (("diffusers", sd), ("original", to_bfl(sd))):
        got = dict(rules.export_params(plan, params, layout))
        assert sorted(got) == sorted(want), layout
        for k in want:
            assert np.array_equal(got[k], want[k]), (layout, k)


def test_unrecognised_rope_split_is_an_error(tmp_path):
    """head_dim 16 has no FLUX-proportioned RoPE split; a single file of it must say so."""
    ref = tiny_flux(False, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    path = tmp_path / "f.safetensors"
    safetensors.numpy.save_file(to_bfl(state_dict_numpy(ref)), str(path))
    with pytest.raises(mj.MMDiTError, match="RoPE"):
        mj.load_transformer(path)
