"""SD3.5-Medium-style sampling (MMDiT-X dual attention, QK-norm, dynamic shift, no T5) with skip-layer
guidance, against diffusers' StableDiffusion3Pipeline."""
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from sampling_tiny import nchw, not_saturated, sd3_pipeline


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3,
                                            base_image_seq_len=16, max_image_seq_len=64)
    pipe, folder = sd3_pipeline(tmp_path_factory.mktemp("sd35"), scheduler=sched, dual=(0, 1), qk_norm="rms_norm",
                                layers=4, t5=False, seed=40)
    return pipe, mj.Pipeline.from_pretrained(folder)


def test_skip_layer_guidance_matches_diffusers(sd35):
    pipe, ours = sd35
    # a layer inside the dual-attention stack and one outside it; SLG on steps 1..4 of 10
    layers, start, stop = (0, 2), 0.01, 0.5
    x0 = np.random.default_rng(5).standard_normal((2, 8, 14, 16)).astype(np.float32)
    kw = dict(prompt=["a big dog", "red sky on the mat"], negative_prompt="a cat", height=16, width=28,
              num_inference_steps=10, guidance_scale=4.0, max_sequence_length=7, skip_guidance_layers=list(layers),
              skip_layer_guidance_scale=2.5, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    ref = pipe(latents=nchw(x0), output_type="np", **kw).images
    ref_lat = pipe(latents=nchw(x0), output_type="latent", **kw).images.permute(0, 2, 3, 1).numpy()
    lat = ours(latents=x0, output_type="latent", **kw)
    img = ours(latents=x0, output_type="np", **kw)
    assert not_saturated(ref)
    assert max_rel_err(lat, ref_lat) < 1e-4, max_rel_err(lat, ref_lat)
    assert float(np.abs(img - ref).max()) < 1e-3
    plain = {k: v for k, v in kw.items() if not k.startswith("skip")}
    assert max_rel_err(ours(latents=x0, output_type="latent", **plain), ref_lat) > 1e-3  # SLG acted
