"""End-to-end parity of `mj.Pipeline` with diffusers' FluxPipeline / FluxImg2ImgPipeline on tiny random
FLUX.1-dev (guidance embedder, dynamic shift) and schnell-style (no embedder, no shift) pipelines."""
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from sampling_tiny import flux_packed, flux_pipeline, flux_unpacked, nchw, not_saturated

PROMPTS = ["a photo of the red cat", "big blue sky"]
H, W = 20, 12  # non-square; VAE factor 2 -> 10 x 6 latents -> 5 x 3 tokens


def _latents(seed, shape=(2, H // 2, W // 2, 16)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _compare(pipe, ours, x0, **kw):
    ref = pipe(latents=flux_packed(x0), output_type="np", **kw).images
    ref_lat = flux_unpacked(pipe(latents=flux_packed(x0), output_type="latent", **kw).images, *x0.shape[1:3])
    lat = ours(latents=x0, output_type="latent", **kw)
    img = ours(latents=x0, output_type="np", **kw)
    assert not_saturated(ref)
    # diffusers' sinusoid differs from a correctly rounded one by an ulp at large phases (see
    # tests/test_pipeline_components.py); over the steps this stays ~1e-6
    assert max_rel_err(lat, ref_lat) < 1e-4, max_rel_err(lat, ref_lat)
    assert float(np.abs(img - ref).max()) < 1e-3


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    pipe, folder = flux_pipeline(tmp_path_factory.mktemp("flux_dev"))
    return pipe, mj.Pipeline.from_pretrained(folder)


def test_flux_dev_guidance_matches_diffusers(dev):
    pipe, ours = dev
    assert ours.defaults.guidance_scale == 3.5 and ours.defaults.max_sequence_length == 512
    _compare(pipe, ours, _latents(0), prompt=PROMPTS, height=H, width=W, num_inference_steps=4,
             guidance_scale=4.5, max_sequence_length=10)


def test_flux_true_cfg_matches_diffusers(dev):
    pipe, ours = dev
    _compare(pipe, ours, _latents(1), prompt=PROMPTS, negative_prompt=["a dog", "the mat"], true_cfg_scale=2.5,
             height=H, width=W, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=10)


def test_flux_img2img_matches_diffusers(dev, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_img2img as m
    from diffusers import FluxImg2ImgPipeline

    pipe, ours = dev
    image = np.random.default_rng(2).uniform(0, 1, (2, H, W, 3)).astype(np.float32)
    noise = _latents(3)
    monkeypatch.setattr(m, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())
    monkeypatch.setattr(m, "randn_tensor", lambda shape, **kw: nchw(noise))
    ref = FluxImg2ImgPipeline(**pipe.components)(
        PROMPTS, image=image, strength=0.7, height=H, width=W, num_inference_steps=6, guidance_scale=3.0,
        max_sequence_length=10, output_type="np").images
    img = ours.img2img(image, PROMPTS, strength=0.7, num_inference_steps=6, guidance_scale=3.0,
                       max_sequence_length=10, output_type="np", noise=noise)
    assert not_saturated(ref)
    assert float(np.abs(img - ref).max()) < 1e-3


def test_flux_schnell_settings_match_diffusers(tmp_path):
    pipe, folder = flux_pipeline(tmp_path, guidance=False, seed=50)
    ours = mj.Pipeline.from_pretrained(folder)
    assert not ours.has_guidance_embed
    # schnell: 4 steps, no shift, no guidance (guidance_scale is ignored without an embedder)
    _compare(pipe, ours, _latents(4, (1, 12, 16, 16)), prompt="a big red dog", height=24, width=32,
             num_inference_steps=4, guidance_scale=0.0, max_sequence_length=8)
    with pytest.raises(mj.MMDiTError, match="SD3"):
        ours("a cat", height=16, width=16, skip_guidance_layers=[0])
