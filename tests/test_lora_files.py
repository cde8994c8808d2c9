"""LoRA files: bit-exact round trips of every layout, diffusers loading our files (its
`load_lora_weights`, PEFT underneath) with the same change to its output as to ours, kohya files
checked against diffusers' converter and against ComfyUI's merge rule, PEFT-written files read by
us, and bad files refused."""
import json

import jax
import numpy as np
import pytest
import torch

import mmdit_jax as mj
import flux_oracle
import sd3_oracle
from conftest import max_rel_err
from lora_oracle import SD3_KW, comfyui_merge, drop, flux_pipeline, randomize, sd3_pipeline, vary_ranks
from mmdit_jax import lora as L
from mmdit_jax.io.safetensors_io import TensorFile

FULL = dict(targets="all", rank=4, alpha=3.0, embedders=True)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    ref = sd3_oracle.tiny_model(**SD3_KW)
    folder = tmp_path_factory.mktemp("sd3")
    ref.save_pretrained(folder)
    x = sd3_oracle.inputs(sd3_oracle.tiny_config(**SD3_KW), batch=2, h=10, w=6, text_len=7)
    return folder, mj.load_transformer(folder), x


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    ref = flux_oracle.tiny_flux(True)
    folder = tmp_path_factory.mktemp("flux")
    ref.save_pretrained(folder)
    args = flux_oracle.inputs(np.random.default_rng(0), flux_oracle.TINY, 2, 4, 6, 5, True)
    return folder, mj.load_transformer(folder), args


def _sd3_args(x):
    return tuple(x[k] for k in ("latents", "sigma", "context", "pooled"))


def _ours(model, lora, args, merged=False):
    f = jax.jit(lambda p, lo, a: L.apply_lora(model, p, lo, *a, merged=merged))
    return np.asarray(f(model.params, lora, tuple(args)))


def _sd3_ref(folder, x, lora_file=None):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(folder).eval()
    if lora_file is not None:
        sd3_pipeline(model).load_lora_weights(str(lora_file))
    with torch.no_grad():
        return sd3_oracle.torch_forward(model, x)[1].numpy()


def _flux_ref(folder, args, lora_file=None):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder).eval()
    if lora_file is not None:
        flux_pipeline(model).load_lora_weights(str(lora_file))
    with flux_oracle.correctly_rounded_sinusoid():
        return flux_oracle.reference(model, *args)


def _same(a, b):
    return (a.parts == b.parts and jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize("fmt", L.FORMATS)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_round_trip_is_bit_exact(sd3, flux, tmp_path, family, fmt):
    _, model, _ = sd3 if family == "sd3" else flux
    blocks = dict(blocks=(0, 2)) if family == "sd3" else dict(blocks=(0, 1), single_blocks=(1,))
    lora = vary_ranks(randomize(L.init_lora(model.config, L.LoraConfig(**FULL, **blocks))))
    path = tmp_path / "lora.safetensors"
    L.save_lora(lora, path, model, fmt)
    back = L.load_lora(path, model)
    assert _same(back, lora)
    t1, h1 = L.lora_tensors(lora, model, fmt)
    t2, h2 = L.lora_tensors(back, model, fmt)
    assert h1 == h2 and sorted(t1) == sorted(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)
    assert not list(tmp_path.glob("*.partial"))


def test_diffusers_loads_our_sd3_file(sd3, tmp_path):
    """Every linear layer incl. modulation, embedders and the swapped final/last-context adaLN, blocks
    0 and 2 (dual attention and pre-only context), ranks and alphas varying per module."""
    folder, model, x = sd3
    lora = vary_ranks(randomize(L.init_lora(model.config, L.LoraConfig(**FULL, blocks=(0, 2)))))
    path = tmp_path / "sd3_lora.safetensors"
    L.save_lora(lora, path, model, "diffusers")
    meta = json.loads(TensorFile(str(path)).metadata["lora_adapter_metadata"])
    assert meta["transformer.rank_pattern"] and meta["transformer.alpha_pattern"]
    want = _sd3_ref(folder, x, path)
    base = _sd3_ref(folder, x)
    for merged in (False, True):
        got = _ours(model, lora, _sd3_args(x), merged)
        err = max_rel_err(got, want)
        print(f"SD3 LoRA via diffusers load_lora_weights, merged={merged}: max rel err {err:.2e} "
              f"(LoRA moves the output by {max_rel_err(want, base):.2f})")
        assert err < 1e-5
    assert max_rel_err(want, base) > 1e-2


def test_diffusers_loads_our_flux_file(flux, tmp_path):
    folder, model, args = flux
    lora = vary_ranks(randomize(L.init_lora(model.config, L.LoraConfig(**FULL, blocks=(1,),
                                                                       single_blocks=(0,)))))
    path = tmp_path / "flux_lora.safetensors"
    L.save_lora(lora, path, model, "diffusers")
    want = _flux_ref(folder, args, path)
    got = _ours(model, lora, args)
    err = max_rel_err(got, want)
    print(f"FLUX LoRA via diffusers load_lora_weights: max rel err {err:.2e} "
          f"(LoRA moves the output by {max_rel_err(want, _ours(model, drop(lora, bool), args)):.2f})")
    assert err < 1e-5


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_diffusers_converts_our_flux_kohya_file(flux, tmp_path, fmt):
    """Through diffusers' kohya -> PEFT converter (`lora_unet_...`, or `diffusion_model.` renamed by
    it), fused qkv adapters split by it. Left out here, and covered by the ComfyUI-rule test below:
    single blocks' linear1 (the converter hard-codes FLUX.1's 3072/12288 split) and the embedders /
    final layer (the converter names them without the `transformer.` prefix, so diffusers drops them)."""
    folder, model, args = flux
    lora = randomize(L.init_lora(model.config, L.LoraConfig(targets="all", rank=3, alpha=5.0)), seed=3)
    lora = drop(lora, lambda k: k.endswith("linear1") or not k.startswith(("double", "single")))
    path = tmp_path / f"{fmt}.safetensors"
    L.save_lora(lora, path, model, fmt)
    want = _flux_ref(folder, args, path)
    err = max_rel_err(_ours(model, L.load_lora(path, model), args), want)
    print(f"FLUX {fmt} LoRA via diffusers' converter: max rel err {err:.2e}")
    assert err < 1e-5


def test_kohya_sd3_file_follows_comfyui_merge(sd3, tmp_path):
    """ComfyUI applies `lora_unet_<SAI key>` tensors as W += alpha/rank * up @ down on the SAI weights;
    the merged SAI file, read by diffusers' own converter, must give our output."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    folder, model, x = sd3
    lora = vary_ranks(randomize(L.init_lora(model.config, L.LoraConfig(**FULL, blocks=(0, 2))), seed=4))
    path = tmp_path / "kohya.safetensors"
    L.save_lora(lora, path, model, "kohya")
    tensors = dict(TensorFile(str(path)))
    ref = SD3Transformer2DModel.from_pretrained(folder).eval()
    sai = comfyui_merge(sd3_oracle.to_sai(ref.state_dict(), 3), tensors, prefix="model.diffusion_model.")
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sai))
    with torch.no_grad():
        want = sd3_oracle.torch_forward(ref, x)[1].numpy()
    err = max_rel_err(_ours(model, L.load_lora(path, model), _sd3_args(x)), want)
    print(f"SD3 kohya LoRA vs ComfyUI merge: max rel err {err:.2e}")
    assert err < 1e-5


def test_kohya_flux_file_follows_comfyui_merge(flux, tmp_path):
    """As above for FLUX in ComfyUI's `diffusion_model.` spelling, linear1 and embedders included; the
    merged BFL file is read by our single-file loader (itself checked against diffusers)."""
    from safetensors.torch import save_file

    folder, model, args = flux
    lora = randomize(L.init_lora(model.config, L.LoraConfig(**FULL, single_blocks=(1,))), seed=5)
    path = tmp_path / "comfy.safetensors"
    L.save_lora(lora, path, model, "comfyui")
    tensors = dict(TensorFile(str(path)))
    assert any(k.startswith("diffusion_model.single_blocks.1.linear1.") for k in tensors)
    from diffusers import FluxTransformer2DModel

    sd = FluxTransformer2DModel.from_pretrained(folder).state_dict()
    merged = comfyui_merge(flux_oracle.to_bfl(sd), tensors)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged_bfl.safetensors"))
    want = np.asarray(mj.load_transformer(tmp_path / "merged_bfl.safetensors")(*args))
    err = max_rel_err(_ours(model, L.load_lora(path, model), args), want)
    print(f"FLUX ComfyUI LoRA vs ComfyUI merge: max rel err {err:.2e}")
    assert err < 1e-5


def _peft_lora(model, seed, **cfg):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(init_lora_weights="gaussian", **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_peft_written_lora_loads_into_ours(sd3, flux, tmp_path, family):
    """A LoRA trained the diffusers way (PEFT adapters on the diffusers model, split q/k/v each with
    its own A, rank/alpha patterns), saved by the pipeline's save_lora_weights, read by us."""
    from peft.utils import get_peft_model_state_dict

    if family == "sd3":
        from diffusers import SD3Transformer2DModel as cls, StableDiffusion3Pipeline as pipe
        folder, model, x = sd3
        args = _sd3_args(x)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                   "to_add_out", "ff.net.2", "norm1.linear"]
        patterns = dict(rank_pattern={"transformer_blocks.1.attn.to_k": 2}, alpha_pattern={"ff.net.2": 1.5})
    else:
        from diffusers import FluxPipeline as pipe, FluxTransformer2DModel as cls
        folder, model, args = flux
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "proj_out", "norm.linear"]
        patterns = dict(rank_pattern={"^single_transformer_blocks.0.attn.to_q": 2},
                        alpha_pattern={"proj_mlp": 7.0})
    ref = _peft_lora(cls.from_pretrained(folder).eval(), 0, r=4, lora_alpha=6, target_modules=targets,
                     **patterns)
    pipe.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                           transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    lora = L.load_lora(tmp_path / "pytorch_lora_weights.safetensors", model)
    if family == "sd3":
        with torch.no_grad():
            want = sd3_oracle.torch_forward(ref, x)[1].numpy()
    else:
        with flux_oracle.correctly_rounded_sinusoid():
            want = flux_oracle.reference(ref, *args)
    for merged in (False, True):
        err = max_rel_err(_ours(model, lora, args, merged), want)
        print(f"{family} PEFT-written LoRA in ours, merged={merged}: max rel err {err:.2e}")
        assert err < 1e-5
    # split parts (distinct A per q/k/v/mlp) written fused for kohya: rank grows, output unchanged
    qkv = "single_blocks.blocks.linear1" if family == "flux" else "groups.1.blocks.x_block.attn.qkv"
    assert len(lora.parts[qkv]) >= 3
    L.save_lora(lora, tmp_path / "fused.safetensors", model, "kohya")
    fused = L.load_lora(tmp_path / "fused.safetensors", model)
    assert len(fused.parts[qkv]) == 1
    assert fused.weights[qkv][next(iter(fused.parts[qkv]))]["A"].shape[-1] > 4
    assert max_rel_err(_ours(model, fused, args), _ours(model, lora, args)) < 1e-6


def test_other_spellings_read_the_same(sd3):
    """OneTrainer's `lora_transformer_<diffusers name>`, PEFT keys without `transformer.`, and
    lora_A/lora_B on SAI names behind `model.diffusion_model.` are the same adapters."""
    _, model, _ = sd3
    lora = randomize(L.init_lora(model.config, L.LoraConfig(targets="attn_mlp", rank=2, alpha=1.0)))
    d, header = L.lora_tensors(lora, model, "diffusers")
    base = L.read_lora(d, model, header)
    bare = {k[len("transformer."):]: v for k, v in d.items()}
    assert _same(L.read_lora(bare, model, header), base)
    alpha = {m: np.float32(1.0) for m in {k.rsplit(".lora_", 1)[0] for k in d}}
    onetrainer = {("lora_transformer_" + k[len("transformer."):].rsplit(".lora_", 1)[0].replace(".", "_")
                   + (".lora_down.weight" if ".lora_A." in k else ".lora_up.weight")): v for k, v in d.items()}
    onetrainer.update({"lora_transformer_" + m[len("transformer."):].replace(".", "_") + ".alpha": a
                       for m, a in alpha.items()})
    assert _same(L.read_lora(onetrainer, model), base)
    k, _ = L.lora_tensors(lora, model, "kohya")
    sai = {k2.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k2, v in
           L.lora_tensors(lora, model, "comfyui")[0].items()}
    sai = {"model." + k2: v for k2, v in sai.items()}
    assert _same(L.read_lora(sai, model), L.read_lora(k, model))
    assert _same(L.read_lora(k, model), lora)


def test_bad_files_are_refused(sd3, tmp_path):
    _, model, _ = sd3
    lora = randomize(L.init_lora(model.config, L.LoraConfig(targets="attn", rank=2)))
    good, _ = L.lora_tensors(lora, model, "kohya")
    name = next(k for k in good if k.endswith(".lora_up.weight"))
    cases = {
        "match no layer": {**good, "lora_unet_joint_blocks_9_x_block_attn_qkv.lora_down.weight": good[name]},
        "text-encoder": {**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": good[name]},
        "do not fit": {**good, name: good[name][:, :1]},
        "lacks": {k: v for k, v in good.items() if k != name},
        "DoRA": {**good, name.replace("lora_up.weight", "dora_scale"): good[name]},
    }
    for msg, tensors in cases.items():
        with pytest.raises(mj.MMDiTError, match=msg):
            L.read_lora(tensors, model)
    path = tmp_path / "cut.safetensors"
    L.save_lora(lora, path, model, "kohya")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(mj.MMDiTError, match="cut.safetensors"):
        L.load_lora(path, model)
    with pytest.raises(mj.MMDiTError, match="format"):
        L.save_lora(lora, tmp_path / "x.safetensors", model, "civitai")
    with pytest.raises(mj.MMDiTError, match="flux"):
        L.read_lora(good, mj.preset("flux-dev"))
