"""FLUX.2 VAE parity with diffusers' AutoencoderKLFlux2 plus the FLUX.2 pipelines' own latent steps
(patchify, batch-norm normalisation, packing), its checkpoint layouts, tiling, and the FLUX.1 / FLUX.2
separation of the loader."""
import inspect
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_rel_err, randomize_torch_
from mmdit_jax import MMDiTError, load_vae
from mmdit_jax.io import rules
from mmdit_jax.io.safetensors_io import save_file
from mmdit_jax.vae import VAE, Flux2VAE, Flux2VAEConfig, VAEConfig, load_flux2_vae, weights
from mmdit_jax.vae import flux2_weights
from mmdit_jax.vae.loader import _network as kl_network
from mmdit_jax.vae.loader import vae_weights
from mmdit_jax.vae.flux2_loader import _network

# 3 levels (network factor 4, latents at 1/8 after the 2x2 patch), decoder widths unlike the encoder's,
# 6 latent channels (24 patchified: channel-order mistakes can not cancel out), small groups.
CFG = Flux2VAEConfig(block_out_channels=(16, 32, 32), decoder_block_out_channels=(8, 24, 16),
                     layers_per_block=2, latent_channels=6, norm_num_groups=8)


def nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_vae(cfg, seed=0):
    import torch
    from diffusers import AutoencoderKLFlux2

    kwargs = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    tm = randomize_torch_(AutoencoderKLFlux2(**kwargs).eval(), std=0.1, seed=seed,
                          buffers=("bn.running_mean",))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a variance far from 1 so a missing or misplaced sqrt shows
        tm.bn.running_var.copy_(torch.rand(tm.bn.running_var.shape, generator=g) * 3 + 0.2)
    return tm


def pipeline_encode(tm, x):
    """Flux2Pipeline._encode_vae_image itself (mode of the posterior, patchify, normalise)."""
    import torch
    from diffusers import Flux2Pipeline

    host = types.SimpleNamespace(vae=tm, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        return nhwc(Flux2Pipeline._encode_vae_image(host, nchw(x), generator=None))


def pipeline_decode(tm, z):
    """Flux2KleinPipeline.__call__'s steps after denoising: un-normalise, unpatchify, decode."""
    import torch
    from diffusers import Flux2KleinPipeline

    with torch.no_grad():
        lat = nchw(z)
        mean = tm.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(tm.bn.running_var.view(1, -1, 1, 1) + tm.config.batch_norm_eps)
        lat = Flux2KleinPipeline._unpatchify_latents(lat * std + mean)
        return nhwc(tm.decode(lat, return_dict=False)[0])


def save_pipeline(tm, root):
    tm.save_pretrained(os.path.join(root, "vae"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "Flux2KleinPipeline", "vae": ["diffusers", "AutoencoderKLFlux2"]}, f)
    return root


def bfl_state_dict(cfg, tm):
    """BFL's layout for `tm`, written through our plan, with the counter torch's BatchNorm2d saves."""
    sd = {k: v.numpy() for k, v in tm.state_dict().items() if k != flux2_weights.BN_COUNTER}
    template = _network(cfg, jnp.float32).structure.abstract_params()
    internal = rules.import_params(flux2_weights.plan(cfg), sd, "diffusers", template, "t", lambda a, t: a)
    out = dict(rules.export_params(flux2_weights.plan(cfg), internal, "original"))
    out[flux2_weights.BN_COUNTER] = np.array(7, np.int64)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tm = torch_vae(CFG)
    root = save_pipeline(tm, str(tmp_path_factory.mktemp("flux2vae")))
    return tm, root, load_vae(root)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(1).standard_normal((2, 3, 5, CFG.patched_channels)).astype(np.float32)


def test_config_matches_diffusers_defaults_and_roundtrips():
    import torch
    from diffusers import AutoencoderKLFlux2

    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLFlux2.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    released = Flux2VAEConfig()
    assert Flux2VAEConfig.from_diffusers(defaults) == released
    assert (released.latent_channels, released.patched_channels, released.downsample_factor) == (32, 128, 16)
    assert Flux2VAEConfig.from_diffusers(CFG.to_diffusers()) == CFG
    # the released network's size (parameters and statistics), without allocating either side
    with torch.device("meta"):
        tm = AutoencoderKLFlux2()
    want = sum(t.numel() for t in tm.parameters()) + tm.bn.running_mean.numel() + tm.bn.running_var.numel()
    ours = _network(released, jnp.float32).structure.abstract_params()
    import jax
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(ours)) == want
    with pytest.raises(MMDiTError, match="AutoencoderKLFlux2"):
        Flux2VAEConfig.from_diffusers({"_class_name": "AutoencoderKL"})
    with pytest.raises(MMDiTError, match="as many levels"):
        Flux2VAEConfig(block_out_channels=(32, 64), decoder_block_out_channels=(32,))


def test_f32_parity_with_diffusers_pipeline_latents(model, images, latents):
    import torch
    from diffusers import Flux2Pipeline

    tm, _, vae = model
    assert isinstance(vae, Flux2VAE) and vae.config == CFG
    ref = pipeline_encode(tm, images)
    lat = vae.encode(images)
    assert lat.shape == (2, 3, 5, 24) == ref.shape and lat.dtype == jnp.float32
    enc_err = max_rel_err(lat, ref)
    img = vae.decode(latents)
    dec_err = max_rel_err(img, pipeline_decode(tm, latents))
    print(f"f32 encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert enc_err < 1e-5 and dec_err < 1e-5
    assert img.shape == images.shape
    # NHWC latents flattened row-major are the pipelines' packed tokens (B, h*w, 128)
    packed = Flux2Pipeline._pack_latents(torch.from_numpy(ref.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_array_equal(ref.reshape(2, 15, 24), packed)


def test_patchify_inverts_and_matches_the_pipelines(latents):
    import torch
    from diffusers import Flux2Pipeline
    from mmdit_jax.vae.flux2_network import patchify, unpatchify

    raw = np.random.default_rng(2).standard_normal((2, 6, 10, 6)).astype(np.float32)
    ours = np.asarray(patchify(jnp.asarray(raw), (2, 2)))
    ref = nhwc(Flux2Pipeline._patchify_latents(nchw(raw)))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(ours), (2, 2))), raw)
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(latents), (2, 2))),
                                  nhwc(Flux2Pipeline._unpatchify_latents(torch.from_numpy(
                                      latents.transpose(0, 3, 1, 2).copy()))))


def test_bfl_layout_matches_diffusers_ldm_converter(model):
    """BFL's names are the LDM VAE's plus encoder.quant_conv / decoder.post_quant_conv and bn.*:
    diffusers' LDM converter, given our BFL tensors with the quant convs moved to the top, gives
    AutoencoderKLFlux2's state dict."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    tm, _, _ = model
    bfl = bfl_state_dict(CFG, tm)
    assert bfl["encoder.quant_conv.weight"].shape == (12, 12, 1, 1)
    assert bfl["decoder.post_quant_conv.weight"].shape == (6, 6, 1, 1)
    moved = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"):
             torch.from_numpy(np.asarray(v)) for k, v in bfl.items() if not k.startswith("bn.")}
    converted = convert_ldm_vae_checkpoint(moved, CFG.to_diffusers())
    ref = {k: v for k, v in tm.state_dict().items() if not k.startswith("bn.")}
    assert sorted(converted) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(converted[k].numpy(), ref[k].numpy(), err_msg=k)
    for k in flux2_weights.BN_KEYS:
        np.testing.assert_array_equal(bfl[k], tm.state_dict()[k].numpy())


def test_folders_and_single_files_load_identically(model, images, latents, tmp_path):
    tm, root, vae = model
    bfl = bfl_state_dict(CFG, tm)
    paths = {"bare": str(tmp_path / "ae.safetensors"), "prefixed": str(tmp_path / "comfy.safetensors"),
             "diffusers_file": str(tmp_path / "diffusers.safetensors")}
    save_file(bfl, paths["bare"])
    save_file({"vae." + k: v for k, v in bfl.items()}, paths["prefixed"])
    save_file({k: v.numpy() for k, v in tm.state_dict().items()}, paths["diffusers_file"])
    ref = (np.asarray(vae.encode(images)), np.asarray(vae.decode(latents)))
    for name, path in paths.items():
        # single files hold no GroupNorm group count (32 in every released file, 8 here): given
        loaded = load_vae(path, config=CFG)
        assert isinstance(loaded, Flux2VAE), name
        np.testing.assert_array_equal(np.asarray(loaded.encode(images)), ref[0], err_msg=name)
        np.testing.assert_array_equal(np.asarray(loaded.decode(latents)), ref[1], err_msg=name)
    # everything else, decoder widths included, is read from the shapes, in both layouts
    diffusers_sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    for sd, layout in ((bfl, "original"), (diffusers_sd, "diffusers")):
        tensors = flux2_weights.VAETensors(sd)
        assert flux2_weights.layout_of(tensors) == layout
        assert flux2_weights.config_from_weights(tensors, layout, "t", norm_num_groups=8) == CFG
    for path in (root, os.path.join(root, "vae")):
        np.testing.assert_array_equal(np.asarray(load_flux2_vae(path).decode(latents)), ref[1])


def random_params(template, seed=0):
    """Random numpy arrays shaped like an abstract params tree (nothing compiled)."""
    import jax
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), template)


def kl_folder(root, cfg, params):
    """A FLUX.1-style pipeline folder holding an AutoencoderKL."""
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    save_file({k: np.asarray(v) for k, v in rules.export_params(weights.plan(cfg), params, "diffusers")},
              str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return str(root)


def test_flux1_and_flux2_files_are_never_mistaken(model, tmp_path):
    tm, _, _ = model
    # 32 groups in both, so the single files load with nothing but the path
    flux1_cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16)
    flux2_cfg = Flux2VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
    kl = random_params(kl_network(flux1_cfg, jnp.float32).structure.abstract_params())
    f2 = random_params(_network(flux2_cfg, jnp.float32).structure.abstract_params())
    flux1, flux2 = str(tmp_path / "flux1_ae.safetensors"), str(tmp_path / "flux2_ae.safetensors")
    save_file(dict(rules.export_params(weights.plan(flux1_cfg), kl, "original")), flux1)
    save_file(dict(rules.export_params(flux2_weights.plan(flux2_cfg), f2, "original")), flux2)

    got1, got2 = load_vae(flux1), load_vae(flux2)
    assert type(got1) is VAE and got1.config.latent_channels == 16
    assert type(got2) is Flux2VAE and got2.config == flux2_cfg
    assert isinstance(vae_weights(flux2).config, Flux2VAEConfig)  # what mmdit-convert reads
    assert load_vae(flux2, family="flux2").config == flux2_cfg
    with pytest.raises(MMDiTError, match="not a FLUX.2 VAE"):
        load_vae(flux1, family="flux2")
    with pytest.raises(MMDiTError, match="not a FLUX.2 VAE"):
        load_flux2_vae(flux1)
    for fam in ("flux", "sd3"):
        with pytest.raises(MMDiTError, match=f"family '{fam}' does not apply"):
            load_vae(flux2, family=fam)
    folder = kl_folder(tmp_path / "kl", flux1_cfg, kl)
    assert type(load_vae(folder)) is VAE
    with pytest.raises(MMDiTError, match="expected an AutoencoderKLFlux2 config"):
        load_flux2_vae(folder)
    # FLUX.2 weights under a config.json that claims the FLUX.1 class: the statistics are refused
    wrong = tmp_path / "wrong"
    tm.save_pretrained(str(wrong))
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (wrong / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                   if k in VAEConfig().to_diffusers()}))
    with pytest.raises(MMDiTError, match="unexpected keys.*bn.running_mean"):
        load_vae(str(wrong), config=VAEConfig(block_out_channels=(16, 32, 32), latent_channels=6,
                                              norm_num_groups=8, use_quant_conv=True,
                                              use_post_quant_conv=True))


def test_bad_input_gives_one_error(model):
    _, _, vae = model
    with pytest.raises(MMDiTError, match=r"images must be \(B, H, W, 3\)"):
        vae.encode(np.zeros((1, 16, 16, 4), np.float32))
    with pytest.raises(MMDiTError, match="multiples of 8"):
        vae.encode(np.zeros((1, 16, 20, 3), np.float32))
    with pytest.raises(MMDiTError, match=r"latents must be \(B, H, W, 24\)"):
        vae.decode(np.zeros((1, 2, 2, 6), np.float32))
    # the released network: sides multiples of 16, latents of 128 channels (checked before any compute)
    released = Flux2VAEConfig()
    big = Flux2VAE(released, _network(released, jnp.float32).structure.abstract_params())
    with pytest.raises(MMDiTError, match="multiples of 16, got 24x32"):
        big.encode(np.zeros((1, 24, 32, 3), np.float32))
    with pytest.raises(MMDiTError, match=r"latents must be \(B, H, W, 128\)"):
        big.decode(np.zeros((1, 4, 4, 32), np.float32))
    for err in (lambda: vae.decode_tiled(np.zeros((1, 4, 4, 24), np.float32), tile_size=30),
                lambda: vae.encode_tiled(np.zeros((1, 64, 64, 3), np.float32), tile_size=36)):
        with pytest.raises(MMDiTError, match=r"multiple of .*\b4$"):
            err()


@pytest.mark.slow
def test_tiled_matches_diffusers_tiling(model):
    tm, _, vae = model
    tile = 32  # pixels: 8-latent tiles (network factor 4) with a stride of 6
    tm.enable_tiling()
    tm.tile_sample_min_size, tm.tile_latent_min_size, tm.tile_overlap_factor = tile, tile // 4, 0.25
    try:
        z = np.random.default_rng(4).standard_normal((1, 7, 11, 24)).astype(np.float32)
        compiled = vae._decode_tile._cache_size()
        tiled = vae.decode_tiled(z, tile_size=tile, overlap=0.25)
        dec_err = max_rel_err(tiled, pipeline_decode(tm, z))  # diffusers decodes 14x22 latents tiled
        assert vae._decode_tile._cache_size() - compiled <= 4  # one compile per tile shape
        x = np.random.default_rng(5).uniform(-1, 1, (1, 56, 88, 3)).astype(np.float32)
        enc_err = max_rel_err(vae.encode_tiled(x, tile_size=tile, overlap=0.25), pipeline_encode(tm, x))
    finally:
        tm.disable_tiling()
    print(f"tiled rel err vs diffusers tiling: decode {dec_err:.2e} encode {enc_err:.2e}")
    assert dec_err < 1e-5 and enc_err < 1e-5
    # latents that fit in one tile are decoded whole
    small = z[:, :4, :4]
    np.testing.assert_array_equal(np.asarray(vae.decode_tiled(small, tile_size=tile)),
                                  np.asarray(vae.decode(small)))


def test_bf16_runs_with_float32_statistics(model, images, latents):
    tm, root, _ = model
    vae = load_vae(root, dtype="bfloat16")
    assert jnp.asarray(vae.params["decoder"]["conv_in"]["kernel"]).dtype == jnp.bfloat16
    assert jnp.asarray(vae.params["bn"]["running_var"]).dtype == jnp.float32
    lat, img = vae.encode(images), vae.decode(latents)
    assert lat.dtype == img.dtype == jnp.float32
    enc_err = max_rel_err(lat, pipeline_encode(tm, images))
    dec_err = max_rel_err(img, pipeline_decode(tm, latents))
    print(f"bf16 encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    # bfloat16 keeps 8 mantissa bits; the lower bound proves the network really ran in bfloat16
    assert 1e-4 < enc_err < 5e-2 and 1e-4 < dec_err < 5e-2
