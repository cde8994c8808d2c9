"""End-to-end parity of `mj.Pipeline` with diffusers' StableDiffusion3Pipeline / Img2Img on tiny random
pipelines saved to disk: same initial latents and prompts -> same latents and images (float32)."""
import numpy as np
import pytest
import torch

import mmdit_jax as mj
from conftest import max_rel_err
from sampling_tiny import nchw, not_saturated, sd3_pipeline

PROMPTS = ["a red cat on the mat", "blue sky"]
NEG = ["a dog", "the photo"]
H, W = 24, 16  # non-square; the tiny VAE has factor 2 -> 12 x 8 latents


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pipe, folder = sd3_pipeline(tmp_path_factory.mktemp("sd3"))
    return pipe, mj.Pipeline.from_pretrained(folder), folder


def _latents(seed, shape=(2, H // 2, W // 2, 16)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _compare(pipe, ours, x0, **kw):
    ref_img = pipe(latents=nchw(x0), output_type="np", **kw).images
    ref_lat = pipe(latents=nchw(x0), output_type="latent", **kw).images.permute(0, 2, 3, 1).numpy()
    lat = ours(latents=x0, output_type="latent", **kw)
    img = ours(latents=x0, output_type="np", **kw)
    assert not_saturated(ref_img)
    assert img.shape == ref_img.shape and img.dtype == np.float32
    lat_err, img_err = max_rel_err(lat, ref_lat), float(np.abs(img - ref_img).max())
    assert lat_err < 1e-4, lat_err
    assert img_err < 1e-3, img_err
    return lat_err, img_err


def test_cfg_with_negative_prompt_matches_diffusers(sd3):
    pipe, ours, _ = sd3
    _compare(pipe, ours, _latents(0), prompt=PROMPTS, negative_prompt=NEG, height=H, width=W,
             num_inference_steps=4, guidance_scale=5.0, max_sequence_length=12)
    # the whole loop (CFG included) compiled once for this shape, though two outputs were asked for
    assert ours._denoise._cache_size() == 1


def test_no_cfg_two_images_per_prompt(sd3):
    pipe, ours, _ = sd3
    # guidance 1.0 turns CFG off (SD3.5 Large Turbo style); images per prompt repeat the embeddings
    _compare(pipe, ours, _latents(1, (4, 8, 12, 16)), prompt=PROMPTS, height=16, width=24,
             num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, max_sequence_length=9)


def test_compiles_once_for_repeated_calls(sd3):
    _, ours, _ = sd3
    kw = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=8, output_type="latent")
    ours("a cat", guidance_scale=3.0, seed=1, **kw)
    before = ours._denoise._cache_size()
    a = ours("a dog", negative_prompt="blue", guidance_scale=6.0, seed=1, **kw)
    b = ours("a dog", negative_prompt="blue", guidance_scale=6.0, seed=1, **kw)
    c = ours("a dog", negative_prompt="blue", guidance_scale=6.0, seed=2, **kw)
    assert ours._denoise._cache_size() == before  # new prompts, scale and seed: no new compile
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same seed and settings, same latents
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1


def test_defaults_from_the_folder(sd3):
    _, ours, _ = sd3
    # StableDiffusion3Pipeline: sample_size (6) * VAE factor (2); 28 steps; guidance 7
    assert ours.defaults.num_inference_steps == 28 and ours.defaults.guidance_scale == 7.0
    out = ours("a cat", num_inference_steps=1, max_sequence_length=8, output_type="np")
    assert out.shape == (1, 12, 12, 3)


def test_dpmpp_2m_matches_the_reference_sampler_on_diffusers_networks(sd3):
    """DPM-Solver++(2M) as sd3_impls.sample_dpmpp_2m runs it, written here in torch float32 around the
    diffusers transformer and text encoders, from diffusers' sigmas."""
    pipe, ours, _ = sd3
    x0, n, g = _latents(2), 5, 4.0
    lat = ours(PROMPTS, negative_prompt=NEG, height=H, width=W, num_inference_steps=n, guidance_scale=g,
               latents=x0, max_sequence_length=12, output_type="latent", sampler="dpmpp_2m")
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=NEG,
                                                          max_sequence_length=12)
        pipe.scheduler.set_timesteps(n)
        sig = pipe.scheduler.sigmas
        x, old = nchw(x0), None
        for i in range(n):
            v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=(sig[i] * 1000).expand(4),
                                 encoder_hidden_states=torch.cat([neg, pos]),
                                 pooled_projections=torch.cat([neg_pooled, pooled])).sample
            vu, vc = v.chunk(2)
            d = x - sig[i] * (vu + g * (vc - vu))
            t, t_next = -torch.log(sig[i]), -torch.log(sig[i + 1])
            h = t_next - t
            if old is None or sig[i + 1] == 0:
                x = (torch.exp(-t_next) / torch.exp(-t)) * x - torch.expm1(-h) * d
            else:
                r = (t + torch.log(sig[i - 1])) / h
                x = (torch.exp(-t_next) / torch.exp(-t)) * x - torch.expm1(-h) * (
                    (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
            old = d
    ref = x.permute(0, 2, 3, 1).numpy()
    assert max_rel_err(lat, ref) < 1e-4, max_rel_err(lat, ref)
    euler = ours(PROMPTS, negative_prompt=NEG, height=H, width=W, num_inference_steps=n, guidance_scale=g,
                 latents=x0, max_sequence_length=12, output_type="latent")
    assert max_rel_err(euler, ref) > 1e-2  # the solvers really differ


def test_user_sigmas_and_bfl_schedule_match_diffusers(sd3):
    """sigmas= as diffusers takes them (then shifted by the scheduler), and schedule="bfl" (for SD3,
    unshifted linspace(1, 0, N + 1)) against diffusers given the sigmas its shift maps onto that line."""
    pipe, ours, _ = sd3
    kw = dict(prompt=PROMPTS, negative_prompt=NEG, height=H, width=W, num_inference_steps=4, guidance_scale=4.0,
              max_sequence_length=12)
    x0 = _latents(7)
    _compare(pipe, ours, x0, sigmas=[1.0, 0.7, 0.45, 0.2], **kw)
    shift, line = pipe.scheduler.config.shift, np.linspace(1.0, 0.25, 4)
    assert shift != 1.0
    unshifted = list(line / (shift - (shift - 1) * line))  # shift * s / (1 + (shift - 1) s) = line
    ref = pipe(latents=nchw(x0), output_type="latent", sigmas=unshifted, **kw).images.permute(0, 2, 3, 1).numpy()
    bfl = ours(latents=x0, output_type="latent", schedule="bfl", **kw)
    assert max_rel_err(bfl, ref) < 1e-4, max_rel_err(bfl, ref)
    default = ours(latents=x0, output_type="latent", **kw)
    assert max_rel_err(default, ref) > 1e-2  # the schedules differ
    with pytest.raises(mj.MMDiTError, match="exclude"):
        ours(latents=x0, output_type="latent", schedule="bfl", sigmas=[1.0, 0.7, 0.45, 0.2], **kw)


def test_img2img_matches_diffusers(sd3, monkeypatch):
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as m
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, ours, _ = sd3
    image = np.random.default_rng(3).uniform(0, 1, (1, H, W, 3)).astype(np.float32)
    noise = _latents(4)
    # our encoder returns the posterior mean: make diffusers take it too, and our noise
    monkeypatch.setattr(m, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())
    monkeypatch.setattr(m, "randn_tensor", lambda shape, **kw: nchw(noise))
    ref = StableDiffusion3Img2ImgPipeline(**pipe.components)(
        PROMPTS, image=image, strength=0.6, negative_prompt=NEG, height=H, width=W, num_inference_steps=5,
        guidance_scale=4.5, max_sequence_length=12, output_type="np").images
    img = ours.img2img(image, PROMPTS, strength=0.6, negative_prompt=NEG, num_inference_steps=5,
                       guidance_scale=4.5, max_sequence_length=12, output_type="np", noise=noise)
    assert not_saturated(ref)
    assert float(np.abs(img - ref).max()) < 1e-3


def test_bad_sizes_and_inputs(sd3):
    _, ours, _ = sd3
    with pytest.raises(mj.MMDiTError, match="multiples of 4"):
        ours("a cat", height=18, width=16)
    with pytest.raises(mj.MMDiTError, match="latents must have shape"):
        ours("a cat", height=16, width=16, latents=np.zeros((1, 4, 4, 16), np.float32))
    with pytest.raises(mj.MMDiTError, match="negative prompts"):
        ours(["a", "b"], negative_prompt=["c"], height=16, width=16)
    with pytest.raises(mj.MMDiTError, match="sampler"):
        ours("a cat", height=16, width=16, sampler="heun")
    with pytest.raises(mj.MMDiTError, match="strength"):
        ours.img2img(np.zeros((16, 16, 3), np.float32), "a cat", strength=0.0, num_inference_steps=2)


@pytest.mark.slow
def test_bfloat16_pipeline_stays_close_to_float32(sd3):
    _, ours, folder = sd3
    kw = dict(prompt=PROMPTS, negative_prompt=NEG, height=H, width=W, num_inference_steps=4, guidance_scale=5.0,
              max_sequence_length=12, latents=_latents(6))
    low_pipe = mj.Pipeline.from_pretrained(folder, dtype="bfloat16")
    ref, low = ours(**kw, output_type="np"), low_pipe(**kw, output_type="np")
    assert low.dtype == np.float32 and np.isfinite(low).all()
    err = float(np.abs(low - ref).max())
    lat_err = max_rel_err(low_pipe(**kw, output_type="latent"), ours(**kw, output_type="latent"))
    print(f"bfloat16 pipeline vs float32: latents max rel err {lat_err:.2e}, pixels max abs {err:.2e}")
    # bf16 weights and activations: different, but the same picture (measured: pixels 1.5e-3, latents 7.8e-3)
    assert 0 < err < 1.5e-2, err
    assert lat_err < 5e-2, lat_err


@pytest.mark.parametrize("platform,want", [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_default_dtype_follows_the_backend(sd3, monkeypatch, platform, want):
    """Without a dtype, GPU/TPU sample in bfloat16 and the CPU in float32 (loading only: nothing runs)."""
    import jax
    import jax.numpy as jnp

    from mmdit_jax.transformer import default_dtype

    _, _, folder = sd3
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert default_dtype() == want
    pipe = mj.Pipeline.from_pretrained(folder)
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoders.dtype == jnp.dtype(want)
    leaves = jax.tree.leaves(pipe.transformer.params)
    assert {x.dtype for x in leaves} == {jnp.dtype(want)}


def test_large_latents_decode_tiled(sd3, monkeypatch):
    """Above `tiled_decode_above` latent pixels the images come from the tiled decoder (the same pixels
    as vae.decode_tiled, close to the whole decode); at or below it, from the whole decode."""
    _, ours, _ = sd3
    z = _latents(8, (1, 12, 8, 16))
    whole = ours._output(z, "np")
    np.testing.assert_array_equal(whole, np.asarray(ours._decode(ours._vparams, z)))
    monkeypatch.setattr(ours, "decode_tile_size", 16)  # 8-latent tiles (the tiny VAE has factor 2)
    monkeypatch.setattr(ours, "tiled_decode_above", 12 * 8)
    np.testing.assert_array_equal(ours._output(z, "np"), whole)  # not above: decoded whole
    monkeypatch.setattr(ours, "tiled_decode_above", 12 * 8 - 1)
    tiled = ours._output(z, "np")
    want = np.clip(np.asarray(ours.vae.decode_tiled(z, tile_size=16)) / 2 + 0.5, 0, 1)
    np.testing.assert_array_equal(tiled, want)
    gap = max_rel_err(tiled, whole)
    print(f"tiled vs whole decode: max rel err {gap:.3f}")
    assert 0 < gap < 0.25  # tests/test_vae.py's tolerance for tiles of random-weight VAEs
