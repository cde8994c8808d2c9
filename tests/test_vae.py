"""VAE parity with diffusers' AutoencoderKL, checkpoint layouts, tiling and bfloat16."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_rel_err, randomize_torch_
from mmdit_jax import MMDiTError, load_vae
from mmdit_jax.io import rules
from mmdit_jax.io.safetensors_io import save_file
from mmdit_jax.vae import VAE, VAEConfig, weights
from mmdit_jax.vae.config import FAMILY_SCALE_SHIFT

# Parity model: 3 levels, small groups, quant convs on (the classic SD layout, so those paths run too).
PARITY = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=16,
                   norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True)
# Layout model: SD3/FLUX-like (no quant convs, 32 groups so single files need no config).
LAYOUT = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16,
                   norm_num_groups=32)


def mean_rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).mean() / np.abs(ref).mean())


def torch_vae(cfg, seed=0):
    from diffusers import AutoencoderKL

    kwargs = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    # std 0.1 keeps activations O(1) through the GroupNorm/SiLU stack for these widths
    return randomize_torch_(AutoencoderKL(**kwargs).eval(), std=0.1, seed=seed)


def nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_encode(tm, cfg, x):
    import torch
    with torch.no_grad():
        mean = nhwc(tm.encode(nchw(x)).latent_dist.mean)
    return (mean - cfg.shift_factor) * cfg.scaling_factor


def torch_decode(tm, cfg, z):
    import torch
    with torch.no_grad():
        return nhwc(tm.decode(nchw(z) / cfg.scaling_factor + cfg.shift_factor).sample)


def save_pipeline(tm, root):
    """A diffusers pipeline folder holding only the VAE."""
    tm.save_pretrained(os.path.join(root, "vae"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline", "vae": ["diffusers", "AutoencoderKL"]}, f)
    return root


def ldm_state_dict(cfg, tm):
    """The LDM-layout tensors for `tm`, written through our plan (checked against diffusers below)."""
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    internal = rules.import_params(weights.plan(cfg), sd, "diffusers", _template(cfg), "t", lambda a, t: a)
    return dict(rules.export_params(weights.plan(cfg), internal, "original"))


def _template(cfg):
    from mmdit_jax.vae.loader import _network
    return _network(cfg, jnp.float32).structure.abstract_params()


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tm = torch_vae(PARITY)
    root = save_pipeline(tm, str(tmp_path_factory.mktemp("parity")))
    return tm, load_vae(root)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    tm = torch_vae(LAYOUT, seed=1)
    cfg = LAYOUT.with_family("sd3")
    tm.register_to_config(scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
    return tm, cfg, str(tmp_path_factory.mktemp("layout"))


def test_config_presets_and_diffusers_roundtrip():
    assert FAMILY_SCALE_SHIFT == {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
    assert VAEConfig.from_diffusers(PARITY.to_diffusers()) == PARITY
    with pytest.raises(MMDiTError, match="AutoencoderKL"):
        VAEConfig.from_diffusers({"_class_name": "AutoencoderTiny"})
    # random init builds exactly the tree the loaders fill
    init = VAE.init(LAYOUT, seed=3).params
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), init)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), _template(LAYOUT))


def test_f32_parity_with_diffusers(parity):
    tm, vae = parity
    x = np.random.default_rng(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
    ref = torch_encode(tm, PARITY, x)
    lat = vae.encode(x)
    assert lat.shape == (2, 6, 10, 16) and lat.dtype == jnp.float32
    enc_err = max_rel_err(lat, ref)
    z = np.random.default_rng(1).standard_normal((2, 6, 10, 16)).astype(np.float32)
    dec_err = max_rel_err(vae.decode(z), torch_decode(tm, PARITY, z))
    print(f"f32 encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert enc_err < 1e-5 and dec_err < 1e-5
    # the pure functions trace with explicit params (no hidden state)
    assert jax.eval_shape(vae.decode_apply, vae.params, z).shape == (2, 24, 40, 3)
    # a repeated shape reuses the compiled function
    compiled = vae._encode._cache_size()
    vae.encode(x + 0.1)
    assert vae._encode._cache_size() == compiled


def test_bf16_runs_and_error_is_measured(layout):
    tm, cfg, root = layout
    path = save_pipeline(tm, os.path.join(root, "bf16"))
    vae = load_vae(path, dtype="bfloat16")
    assert jnp.asarray(vae.params["decoder"]["conv_in"]["kernel"]).dtype == jnp.bfloat16
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 24, 3)).astype(np.float32)
    z = np.random.default_rng(3).standard_normal((1, 8, 12, 16)).astype(np.float32)
    lat, img = vae.encode(x), vae.decode(z)
    assert lat.dtype == img.dtype == jnp.float32
    enc_err = max_rel_err(lat, torch_encode(tm, cfg, x))
    dec_err = max_rel_err(img, torch_decode(tm, cfg, z))
    print(f"bf16 encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    # bfloat16 keeps 8 mantissa bits (relative step 4e-3) and errors compound over the conv stack;
    # the lower bound proves the computation really ran in bfloat16
    assert 1e-4 < enc_err < 5e-2 and 1e-4 < dec_err < 5e-2


NO_ATTENTION = dataclasses.replace(LAYOUT, mid_block_add_attention=False, layers_per_block=2)


@pytest.mark.parametrize("cfg", [LAYOUT, PARITY, NO_ATTENTION], ids=["sd3like", "quant_convs", "no_attn"])
def test_ldm_layout_matches_diffusers_converter(cfg):
    """Our LDM key plan, converted by diffusers' own single-file converter, gives diffusers' state dict;
    and the network is recovered from the LDM tensors' shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    import torch

    tm = torch_vae(cfg)
    ldm = ldm_state_dict(cfg, tm)
    top = cfg.block_out_channels[-1]
    if cfg.mid_block_add_attention:
        assert ldm["encoder.mid.attn_1.q.weight"].shape == (top, top, 1, 1)
    n = len(cfg.block_out_channels)
    # LDM numbers decoder levels like the encoder's: up.0 is full resolution (run last, no upsampler)
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert f"decoder.up.{n - 1}.upsample.conv.weight" in ldm
    converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()},
                                           cfg.to_diffusers())
    ref = tm.state_dict()
    assert sorted(converted) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(converted[k].numpy(), ref[k].numpy(), err_msg=k)
    detected = weights.config_from_weights(ldm, "original", "t", norm_num_groups=cfg.norm_num_groups)
    assert detected.with_family("sd3") == cfg.with_family("sd3")


def test_folder_and_single_files_load_identically(layout):
    tm, cfg, root = layout
    save_pipeline(tm, os.path.join(root, "pipe"))
    ldm = ldm_state_dict(cfg, tm)
    bare = os.path.join(root, "ae.safetensors")
    save_file(ldm, bare)
    sd3 = os.path.join(root, "sd3_single.safetensors")
    other = {"model.diffusion_model.x_embedder.proj.bias": np.zeros(3, np.float32)}
    save_file({**other, **{"first_stage_model." + k: v for k, v in ldm.items()}}, sd3)

    # the tiling test's untiled shapes: the compiled functions are shared (same config and dtype)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 24, 88, 3)).astype(np.float32)
    z = np.random.default_rng(3).standard_normal((1, 28, 44, 16)).astype(np.float32)
    flat = os.path.join(root, "diffusers_layout.safetensors")  # a diffusers state dict as one file
    save_file({k: v.numpy() for k, v in tm.state_dict().items()}, flat)
    outs = []
    for path, kw in ((os.path.join(root, "pipe"), {}), (os.path.join(root, "pipe", "vae"), {}),
                     (bare, {"family": "sd3"}), (sd3, {}), (flat, {"family": "sd3"})):
        vae = load_vae(path, **kw)
        assert vae.config == cfg, path
        outs.append((np.asarray(vae.encode(x)), np.asarray(vae.decode(z))))
    for enc, dec in outs[1:]:
        np.testing.assert_array_equal(enc, outs[0][0])
        np.testing.assert_array_equal(dec, outs[0][1])
    assert max_rel_err(outs[0][0], torch_encode(tm, cfg, x)) < 1e-5
    # without an explicit family, BFL's bare ae.safetensors means FLUX's latent scale and shift
    flux = load_vae(bare).config
    assert (flux.scaling_factor, flux.shift_factor) == FAMILY_SCALE_SHIFT["flux"]
    assert load_vae(sd3, family="flux").config == cfg.with_family("flux")


def test_missing_and_misshaped_keys_give_one_error(layout, tmp_path):
    tm, cfg, _ = layout
    ldm = ldm_state_dict(cfg, tm)
    del ldm["decoder.up.0.block.1.conv2.bias"]
    ldm["encoder.mid.attn_1.k.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    path = str(tmp_path / "ae.safetensors")
    save_file(ldm, path)
    with pytest.raises(MMDiTError) as e:
        load_vae(path)
    msg = str(e.value)
    assert path in msg and "decoder.up.0.block.1.conv2.bias" in msg and "encoder.mid.attn_1.k.weight" in msg
    save_file({"text_encoders.clip_l.x": np.zeros(2, np.float32)}, path)
    with pytest.raises(MMDiTError, match="no VAE found"):
        load_vae(path)


def test_tiled_matches_diffusers_tiling_and_stays_close_to_untiled(layout):
    tm, cfg, root = layout
    save_pipeline(tm, os.path.join(root, "tiles"))
    vae = load_vae(os.path.join(root, "tiles"))
    tile = 32  # pixels; the layout model downsamples 2x, so 16-latent tiles with a stride of 12
    tm.enable_tiling()
    tm.tile_sample_min_size, tm.tile_latent_min_size, tm.tile_overlap_factor = tile, tile // 2, 0.25

    z = np.random.default_rng(4).standard_normal((1, 28, 44, 16)).astype(np.float32)
    compiled = vae._decode_tile._cache_size()
    tiled = vae.decode_tiled(z, tile_size=tile, overlap=0.25)
    assert max_rel_err(tiled, torch_decode(tm, cfg, z)) < 1e-5  # diffusers decodes tiled here
    # 3 x 4 tiles of four distinct shapes: one compile per shape, not per tile
    assert vae._decode_tile._cache_size() - compiled <= 4
    untiled = vae.decode(z)
    dec_gap, dec_mean = max_rel_err(tiled, untiled), mean_rel_err(tiled, untiled)

    # one row of tiles (the vertical blend is exercised by the decode above): two tile shapes to compile
    x = np.random.default_rng(5).uniform(-1, 1, (1, 24, 88, 3)).astype(np.float32)
    enc_tiled = vae.encode_tiled(x, tile_size=tile, overlap=0.25)
    assert max_rel_err(enc_tiled, torch_encode(tm, cfg, x)) < 1e-5
    untiled = vae.encode(x)
    enc_gap, enc_mean = max_rel_err(enc_tiled, untiled), mean_rel_err(enc_tiled, untiled)
    print(f"tiled vs untiled: max rel err decode {dec_gap:.3f} encode {enc_gap:.3f}; "
          f"mean rel err decode {dec_mean:.3f} encode {enc_mean:.3f}")
    # Tiles see their own GroupNorm statistics and attention context, 16-latent tiles are small next
    # to the receptive field and random weights are not smooth, so tiling is far from exact here
    # (measured: max 0.12 / 0.28, mean 0.07 decode); a misplaced or flipped tile gives O(1) errors.
    assert dec_gap < 0.25 and enc_gap < 0.4 and dec_mean < 0.1 and enc_mean < 0.15
    # a latent that fits in one tile is decoded whole
    np.testing.assert_array_equal(np.asarray(vae.decode_tiled(z[:, :16, :16], tile_size=tile)),
                                  np.asarray(vae.decode(z[:, :16, :16])))
    with pytest.raises(MMDiTError, match="multiple"):
        vae.encode_tiled(x, tile_size=33)
