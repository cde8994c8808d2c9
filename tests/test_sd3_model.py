"""SD3 / SD3.5 MMDiT(-X) parity with diffusers' SD3Transformer2DModel and the SAI key layout."""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from safetensors.torch import save_file

import mmdit_jax as mj
from mmdit_jax.sd3.config import MMDiTConfig
from sd3_oracle import inputs, tiny_config, tiny_model, to_sai, torch_forward

CASES = {
    "plain": dict(num_layers=3),
    "qk_norm": dict(num_layers=3, qk_norm="rms_norm"),
    "dual_first_two": dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "dual_scattered": dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(1, 3)),
    "dual_no_qk_norm": dict(num_layers=3, dual_attention_layers=(0,)),
}


def _jax_inputs(x):
    return [jnp.asarray(x[k]) for k in ("latents", "sigma", "context", "pooled")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's diffusers model, saved as a diffusers component folder."""
    out = {}
    for name, kw in CASES.items():
        model = tiny_model(**kw)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(10, 6, 7), (4, 12, 3)])  # (H, W, text length): non-square, crops
def test_parity_with_diffusers(saved, case, shape):
    model, folder = saved[case]
    x = inputs(tiny_config(**CASES[case]), batch=2, h=shape[0], w=shape[1], text_len=shape[2])
    with torch.no_grad():
        ref = torch_forward(model, x)[1].numpy()
    tm = mj.load_transformer(folder)
    out = np.asarray(tm(*_jax_inputs(x)))
    assert out.shape == ref.shape
    assert max_rel_err(out, ref) < 1e-5, max_rel_err(out, ref)


def test_config_from_diffusers_folder(saved):
    _, folder = saved["dual_scattered"]
    cfg = mj.load_transformer(folder).config
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.qk_norm) == (5, 2, 32, True)
    assert cfg.dual_attention_layers == (1, 3) and cfg.pos_embed_max_size == 12
    assert [len(i) for _, i in cfg.groups()] == [1, 1, 1, 1, 1]


def test_sai_writer_agrees_with_diffusers_converter(saved):
    """Our test-side SAI layout is what diffusers' own single-file converter understands."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model, _ = saved["dual_first_two"]
    sd = model.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(to_sai(sd, 4))
    assert sorted(back) == sorted(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
@pytest.mark.parametrize("case", ["plain", "dual_scattered"])
def test_sai_single_file_loads_with_detected_config(saved, tmp_path, case, prefix):
    kw = dict(CASES[case])
    if case == "plain":
        kw.update(attention_head_dim=64)  # without QK norm the head width is not in the file: SD3's 64
    model = tiny_model(seed=1, **kw)
    path = tmp_path / "sd3.safetensors"
    sai = to_sai(model.state_dict(), kw["num_layers"], prefix=prefix)
    if prefix:  # an SAI bundle carries the VAE beside the network; the transformer loader skips it
        sai["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sai.items()}, str(path))
    tm = mj.load_transformer(str(path))
    # sample_size only shapes a fresh sin-cos table and is not recorded in the file
    expect = MMDiTConfig.from_diffusers(tiny_config(**kw))
    assert tm.config == dataclasses.replace(expect, sample_size=tm.config.sample_size)
    x = inputs(tiny_config(**kw))
    with torch.no_grad():
        ref = torch_forward(model, x)[1].numpy()
    assert max_rel_err(tm(*_jax_inputs(x)), ref) < 1e-5


def test_pipeline_folder_and_sharded_weights(saved, tmp_path):
    model, _ = saved["qk_norm"]
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    model.save_pretrained(pipe / "transformer", max_shard_size="20KB")
    assert len(list((pipe / "transformer").glob("*.safetensors"))) > 1
    x = inputs(tiny_config(**CASES["qk_norm"]))
    with torch.no_grad():
        ref = torch_forward(model, x)[1].numpy()
    assert max_rel_err(mj.load_transformer(str(pipe))(*_jax_inputs(x)), ref) < 1e-5


def test_bfloat16_runs_with_measured_error(saved):
    model, folder = saved["dual_first_two"]
    x = inputs(tiny_config(**CASES["dual_first_two"]))
    with torch.no_grad():
        ref = torch_forward(model, x)[1].numpy()
    tm = mj.load_transformer(folder, dtype="bfloat16")
    assert jax.tree.leaves(tm.params)[0].dtype == jnp.bfloat16
    out = tm(*_jax_inputs(x))
    assert out.dtype == jnp.bfloat16
    err = max_rel_err(np.asarray(out.astype(jnp.float32)), ref)
    print(f"bf16 max error relative to output scale: {err:.2e}")
    assert err < 5e-2


def test_gradients_match_torch_autograd(saved):
    model, folder = saved["dual_first_two"]
    x = inputs(tiny_config(**CASES["dual_first_two"]))
    cot = np.random.default_rng(1).standard_normal(x["latents"].shape).astype(np.float32)
    lat, out = torch_forward(model, x, grad=True)
    model.zero_grad()
    (out * torch.tensor(cot)).sum().backward()
    ref_dx = lat.grad.permute(0, 2, 3, 1).numpy()
    ref_dqkv = torch.cat([model.transformer_blocks[1].attn.to_q.weight.grad,
                          model.transformer_blocks[1].attn.to_k.weight.grad,
                          model.transformer_blocks[1].attn.to_v.weight.grad]).T.numpy()
    ref_dfinal = model.proj_out.weight.grad.T.numpy()

    tm = mj.load_transformer(folder)
    lat_j, sig, ctx, pooled = _jax_inputs(x)

    def loss(params, latents):
        return jnp.sum(tm.apply(params, latents, sig, ctx, pooled) * cot)

    g_params, g_lat = jax.jit(jax.grad(loss, argnums=(0, 1)))(tm.params, lat_j)
    # block 1 sits in the first stack (blocks 0 and 1 are dual), index 1 of it
    dqkv = g_params["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]["kernel"][1]  # (in, 3, width)
    dqkv = np.asarray(dqkv).reshape(dqkv.shape[0], -1)  # the plain (in, out) matrix
    assert max_rel_err(g_lat, ref_dx) < 1e-5
    assert max_rel_err(dqkv, ref_dqkv) < 1e-5
    assert max_rel_err(g_params["final_layer"]["linear"]["kernel"], ref_dfinal) < 1e-5


def test_jitted_call_compiles_once_per_shape(saved):
    _, folder = saved["plain"]
    tm = mj.load_transformer(folder)
    cfg = tiny_config(**CASES["plain"])
    for seed in range(3):
        tm(*_jax_inputs(inputs(cfg, seed=seed)))
    assert tm._jitted._cache_size() == 1
    tm(*_jax_inputs(inputs(cfg, h=8, w=8)))
    assert tm._jitted._cache_size() == 2


def test_latents_larger_than_position_table_are_refused(saved):
    _, folder = saved["plain"]
    tm = mj.load_transformer(folder)
    x = inputs(tiny_config(**CASES["plain"]), h=26, w=8)  # 13 patches > 12
    with pytest.raises(mj.MMDiTError, match="exceeds the position table"):
        tm(*_jax_inputs(x))


def test_guidance_is_refused_for_sd3(saved):
    _, folder = saved["plain"]
    tm = mj.load_transformer(folder)
    with pytest.raises(mj.MMDiTError, match="no guidance embedder"):
        tm(*_jax_inputs(inputs(tiny_config(**CASES["plain"]))), guidance=jnp.ones((2,)))


@pytest.mark.parametrize("preset,kw", [
    ("sd3-medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=192)),
    ("sd3.5-medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                          pos_embed_max_size=384, qk_norm="rms_norm",
                          dual_attention_layers=tuple(range(13)))),
    ("sd3.5-large", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, qk_norm="rms_norm")),
])
def test_preset_parameter_counts_equal_diffusers(preset, kw):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        ref = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
                                    joint_attention_dim=4096, pooled_projection_dim=2048,
                                    out_channels=16, **kw)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert mj.count_params(mj.preset(preset)) == n_ref
    assert mj.preset(preset) == MMDiTConfig.from_diffusers(dict(ref.config))


def test_large_turbo_shares_large_network():
    assert mj.preset("sd3.5-large-turbo") == mj.preset("sd3.5-large")


def test_fresh_position_table_matches_diffusers_init():
    from diffusers import SD3Transformer2DModel

    cfg = tiny_config(num_layers=2)
    ref = SD3Transformer2DModel(**cfg).pos_embed.pos_embed[0].numpy()
    tm = mj.Transformer.init(MMDiTConfig.from_diffusers(cfg), seed=0)
    np.testing.assert_allclose(np.asarray(tm.params["pos_embed"]), ref, atol=2e-6)


def test_fresh_model_starts_at_zero_output_and_trains():
    """adaLN-Zero init: the output layer is zero, so the first prediction is exactly zero."""
    cfg = MMDiTConfig.from_diffusers(tiny_config(num_layers=2))
    tm = mj.Transformer.init(cfg, seed=3)
    x = _jax_inputs(inputs(tiny_config(num_layers=2)))
    assert float(jnp.abs(tm(*x)).max()) == 0.0
    g = jax.jit(jax.grad(lambda p: jnp.sum(tm.apply(p, *x) - 1.0) ** 2))(tm.params)
    assert float(jnp.abs(g["final_layer"]["linear"]["kernel"]).max()) > 0
    mask = tm.trainable_mask()  # the position table is a buffer, everything else trains
    assert mask["pos_embed"] is False and all(jax.tree.leaves(mask["groups"]))
    assert jax.tree.structure(mask) == jax.tree.structure(tm.params)


def test_config_rejects_bad_dual_layers():
    with pytest.raises(mj.MMDiTError, match="dual_attention_layers"):
        dataclasses.replace(mj.preset("sd3-medium"), dual_attention_layers=(23,))


@contextlib.contextmanager
def _shared_sinusoid():
    """Feed diffusers the library's timestep sinusoid. The sinusoid is float32 by design on both sides
    (its phase reaches ~1000 rad, where the two float32 exps differ by an ulp: test_flux_model.py's
    test_sinusoid_matches_diffusers checks it); sharing it leaves the float64 network under test."""
    from diffusers.models import embeddings

    from mmdit_jax.layers import timestep_embedding

    def shared(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
               max_period=10000):
        assert flip_sin_to_cos and downscale_freq_shift == 0 and scale == 1
        return torch.from_numpy(np.array(timestep_embedding(timesteps.numpy(), embedding_dim, max_period)))

    original = embeddings.get_timestep_embedding
    embeddings.get_timestep_embedding = shared
    try:
        yield
    finally:
        embeddings.get_timestep_embedding = original


@pytest.mark.parametrize("case", ["plain", "dual_scattered"])
def test_float64_is_exact(tmp_path, case):
    """With float64 everywhere the two implementations agree to rounding at several sigmas, even for
    weights large enough (std 0.3) that float32 runs of either diverge at 1e-4 (measured: 6e-13 without
    QK-norm; diffusers' RMSNorm takes the variance in float32, hence 4e-9 with it)."""
    model = tiny_model(std=0.3, **CASES[case]).double()
    model.save_pretrained(tmp_path)
    x = inputs(tiny_config(**CASES[case]))
    x = {k: v.astype(np.float64) for k, v in x.items()}
    with jax.enable_x64(True):
        tm = mj.load_transformer(str(tmp_path), dtype="float64")
    errs = {}
    for sigma in (0.0, 0.3, 0.7, 1.0):
        x["sigma"][:] = (sigma, sigma / 2)
        with torch.no_grad(), _shared_sinusoid():
            ref = torch_forward(model, x)[1].numpy()
        with jax.enable_x64(True):
            out = np.asarray(tm(*_jax_inputs(x)))
        assert out.dtype == np.float64
        errs[sigma] = max_rel_err(out, ref)
    print(f"float64 {case}: max rel err by sigma {errs}")
    assert max(errs.values()) < (6e-12 if case == "plain" else 4e-8), errs
