"""FLUX.2 checkpoint layouts: our plan's BFL export is what diffusers' BFL -> diffusers converter
inverts; BFL, ComfyUI-prefixed and diffusers-keyed single files load to exactly the weights of the
diffusers folder; FLUX.1 and FLUX.2 files are never taken for one another; float8 files dequantise."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import mmdit_jax as mj
from conftest import max_rel_err
from flux2_oracle import TINY, inputs, reference, state_dict_numpy, tiny_flux2
from flux_oracle import correctly_rounded_sinusoid
from flux_oracle import state_dict_numpy as flux1_state_dict
from flux_oracle import tiny_flux, to_bfl as flux1_to_bfl
from mmdit_jax.flux import weights as flux1_weights
from mmdit_jax.flux2 import weights
from mmdit_jax.io import rules
from mmdit_jax.io.safetensors_io import save_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch oracle, its diffusers folder, the model loaded from it, its BFL state dict by our plan)."""
    ref = tiny_flux2(True, seed=3)
    folder = tmp_path_factory.mktemp("flux2_diffusers")
    ref.save_pretrained(folder)
    model = mj.load_transformer(folder)
    params = jax.tree.map(np.asarray, model.params)
    bfl = dict(rules.export_params(weights.plan(model.config), params, "original"))
    return ref, folder, model, bfl


def test_bfl_export_inverts_diffusers_converter(setup):
    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    ref, _, _, bfl = setup
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in bfl)
    back = convert_flux2_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v.copy()) for k, v in bfl.items()})
    sd = ref.state_dict()
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_export_reproduces_diffusers_layout(setup):
    ref, _, model, _ = setup
    got = dict(rules.export_params(weights.plan(model.config), jax.tree.map(np.asarray, model.params), "diffusers"))
    want = state_dict_numpy(ref)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("layout,prefix", [("original", ""), ("original", "model.diffusion_model."),
                                           ("diffusers", "")], ids=["bfl", "comfyui", "diffusers-file"])
def test_single_file_loads_same_weights(setup, tmp_path, layout, prefix):
    ref, _, from_folder, bfl = setup
    sd = bfl if layout == "original" else state_dict_numpy(ref)
    path = tmp_path / "flux2.safetensors"
    safetensors.numpy.save_file({prefix + k: v for k, v in sd.items()}, str(path))
    model = mj.load_transformer(path)
    assert model.config == from_folder.config
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), model.params, from_folder.params)
    assert all(jax.tree.leaves(same))
    if prefix:  # one forward pass to tie the file to the oracle directly
        args = inputs(np.random.default_rng(5), TINY, 2, 3, 4, 3, True, ((2, 2),))
        with correctly_rounded_sinusoid():
            want = reference(ref, *args)
        got = model(*args[:3], None, args[3], references=args[4])
        assert max_rel_err(np.asarray(got), want) < 2e-5


def test_generations_never_confused(setup, tmp_path):
    """A FLUX.1 file loads as FLUX.1 and a FLUX.2 file as FLUX.2, in every layout and prefix."""
    _, _, _, bfl = setup
    flux1 = flux1_state_dict(tiny_flux(False, seed=0))
    flux2 = state_dict_numpy(tiny_flux2(False, seed=0))
    for keys in (flux1, flux1_to_bfl(flux1)):
        assert weights.detect_layout(keys) is None and flux1_weights.detect_layout(keys) is not None
    for keys in (flux2, bfl):
        assert flux1_weights.detect_layout(keys) is None and weights.detect_layout(keys) is not None
    for name, sd, family in (("f1", flux1_to_bfl(flux1), "flux"), ("f2", bfl, "flux2")):
        path = tmp_path / f"{name}.safetensors"
        safetensors.numpy.save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(path))
        assert mj.load_transformer(path).config.family == family


@pytest.mark.parametrize("direction", ["flux1-as-flux2", "flux2-as-flux1"])
def test_other_generation_in_a_folder_is_one_line_error(setup, tmp_path, direction):
    """A folder whose config.json names one generation while its weights are the other's."""
    ref, folder, _, _ = setup
    flux1 = tiny_flux(False, seed=0)
    cfg_of, weights_of = (ref, flux1) if direction == "flux1-as-flux2" else (flux1, ref)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg_of.config, _class_name=type(cfg_of).__name__)))
    safetensors.numpy.save_file(state_dict_numpy(weights_of), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(mj.MMDiTError, match=f"not in the diffusers {type(cfg_of).__name__} key layout") as e:
        mj.load_transformer(tmp_path)
    assert "\n" not in str(e.value)


def test_float8_file_is_dequantised(setup, tmp_path):
    """BFL-layout float8 file: scalar `weight_scale`s (with activation `input_scale`s beside them), a
    per-row `scale_weight`, an unscaled float8 tensor; it loads as the float32 file of the dequantised
    values would."""
    _, folder, from_folder, bfl = setup
    f8, plain = {}, {}
    for i, (k, v) in enumerate(sorted(bfl.items())):
        if v.ndim != 2 or i % 4 == 3:  # norm scales and some matrices stay float32
            f8[k] = plain[k] = v
            continue
        layer = k[:-len(".weight")]
        if i % 4 == 0:  # one scale for the whole tensor
            scale = np.float32(np.abs(v).max() / 448.0)
            q = (v / scale).astype(ml_dtypes.float8_e4m3fn)
            f8.update({k: q, f"{layer}.weight_scale": np.array(scale), f"{layer}.input_scale": np.float32(1.0)})
            plain[k] = q.astype(np.float32) * scale
        elif i % 4 == 1:  # one scale per output row
            scale = (np.abs(v).max(axis=1) / 448.0).astype(np.float32)
            q = (v / scale[:, None]).astype(ml_dtypes.float8_e4m3fn)
            f8.update({k: q, f"{layer}.scale_weight": scale})
            plain[k] = q.astype(np.float32) * scale[:, None]
        else:  # float8 values, no scale
            q = v.astype(ml_dtypes.float8_e4m3fn)
            f8[k] = q
            plain[k] = q.astype(np.float32)
    f8["scaled_fp8"] = np.zeros(0, ml_dtypes.float8_e4m3fn)
    save_file(f8, str(tmp_path / "f8.safetensors"))
    save_file(plain, str(tmp_path / "plain.safetensors"))
    got, want = mj.load_transformer(tmp_path / "f8.safetensors"), mj.load_transformer(tmp_path / "plain.safetensors")
    assert got.config == want.config == from_folder.config
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got.params, want.params)
    assert all(jax.tree.leaves(same))
    # and the dequantised weights are the originals to float8 precision
    close = jax.tree.map(lambda a, b: max_rel_err(a, b) < 0.07, got.params, from_folder.params)
    assert all(jax.tree.leaves(close))


def test_float8_scale_without_weight_is_an_error(setup, tmp_path):
    _, _, _, bfl = setup
    save_file({**bfl, "img_in.x.weight_scale": np.float32(1.0)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(mj.MMDiTError, match="img_in.x.weight_scale"):
        mj.load_transformer(tmp_path / "bad.safetensors")


def test_pipeline_folder_refused_by_the_sampler_in_one_line(setup, tmp_path):
    """mj.Pipeline does not sample FLUX.2 yet: a FLUX.2 pipeline folder fails at once, naming the folder,
    before its (large) VAE and text encoders are read."""
    import shutil

    from mmdit_jax.errors import MMDiTError

    _, folder, _, _ = setup
    pipe = tmp_path / "klein"
    shutil.copytree(folder, pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"], "text_encoder": ["transformers", "Qwen3ForCausalLM"]}))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        mj.families.families()["flux2"].schedulers["flux2"]))
    with pytest.raises(MMDiTError, match=r"klein: mj.Pipeline does not sample flux2 models yet") as e:
        mj.Pipeline.from_pretrained(pipe)
    assert "\n" not in str(e.value)
