"""FLUX.1 transformer vs diffusers' FluxTransformer2DModel on random tiny configs (float32 parity,
bf16 drift, input errors). Weights travel through a saved diffusers folder and
`mj.load_transformer`, so the diffusers key plan is exercised too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from flux_oracle import TINY, correctly_rounded_sinusoid, inputs, reference, tiny_flux
from mmdit_jax.layers import timestep_embedding


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{guidance: (torch oracle, loaded mmdit_jax Transformer)} for dev-style and schnell-style."""
    out = {}
    for guidance in (True, False):
        ref = tiny_flux(guidance, seed=int(guidance))
        folder = tmp_path_factory.mktemp(f"flux_g{int(guidance)}")
        ref.save_pretrained(folder)
        out[guidance] = (ref, mj.load_transformer(folder))
    return out


@pytest.mark.parametrize("guidance,batch,h,w,text_len", [
    (True, 2, 4, 6, 5),    # dev-style, non-square, batch 2
    (True, 1, 6, 6, 1),    # square, a single text token
    (False, 2, 8, 4, 7),   # schnell-style, tall
])
def test_parity_float32(pair, guidance, batch, h, w, text_len):
    ref, model = pair[guidance]
    assert model.config.family == "flux" and model.config.guidance_embed == guidance
    args = inputs(np.random.default_rng(h * w + text_len), TINY, batch, h, w, text_len, guidance)
    with correctly_rounded_sinusoid():
        want = reference(ref, *args)
    got = np.asarray(model(*args))
    assert got.shape == (batch, h, w, 16)
    err = max_rel_err(got, want)
    print(f"float32 parity guidance={guidance} {batch}x{h}x{w} text={text_len}: max rel err {err:.2e}")
    assert err < 1e-5


def test_sinusoid_matches_diffusers(pair):
    """Against the unpatched oracle: the sinusoid agrees to float32 exp rounding (an ulp of a frequency
    times a phase of up to 5000 rad), and so does the whole dev-style network, more loosely."""
    import torch
    from diffusers.models.embeddings import Timesteps

    g = np.random.default_rng(1).uniform(0.0, 5.0, 256).astype(np.float32)
    want = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(g) * 1000).numpy()
    got = np.asarray(jax.jit(lambda t: timestep_embedding(1000 * t))(g))
    assert np.abs(got - want).max() < 5e-4
    with correctly_rounded_sinusoid():
        want = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(g) * 1000).numpy()
    assert np.abs(got - want).max() < 1e-6

    # the whole dev-style network over guidance values across FLUX's range (phases up to 5000 rad)
    ref, model = pair[True]
    args = list(inputs(np.random.default_rng(29), TINY, 16, 4, 6, 5, True))
    args[4] = np.linspace(1.0, 6.0, 16).astype(np.float32)
    out = np.asarray(model(*args))
    err = max_rel_err(out, reference(ref, *args))
    with correctly_rounded_sinusoid():
        patched = max_rel_err(out, reference(ref, *args))
    print(f"float32 vs unpatched diffusers: max rel err {err:.2e} (patched sinusoid: {patched:.2e})")
    assert err < 1e-4 and patched < 1e-5


def test_bfloat16_close_to_float32(pair):
    _, model32 = pair[True]
    model16 = mj.Transformer(model32.config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), model32.params),
                             "bfloat16")
    assert jax.tree.leaves(model16.params)[0].dtype == jnp.bfloat16
    args = inputs(np.random.default_rng(3), TINY, 2, 4, 6, 5, True)
    out16 = np.asarray(model16(*args).astype(jnp.float32))
    err = max_rel_err(out16, np.asarray(model32(*args)))
    print(f"bfloat16 vs float32: max rel err {err:.2e}")
    assert np.isfinite(out16).all() and err < 5e-2


def test_guidance_required_exactly_for_dev(pair):
    rng = np.random.default_rng(0)
    lat, sigma, ctx, pooled, g = inputs(rng, TINY, 1, 4, 4, 2, True)
    with pytest.raises(mj.MMDiTError, match="guidance embedder"):
        pair[True][1](lat, sigma, ctx, pooled)  # dev without guidance
    with pytest.raises(mj.MMDiTError, match="no guidance embedder"):
        pair[False][1](lat, sigma, ctx, pooled, g)  # schnell with guidance


def test_odd_latent_size_rejected(pair):
    lat, sigma, ctx, pooled, _ = inputs(np.random.default_rng(0), TINY, 1, 5, 4, 2, False)
    with pytest.raises(mj.MMDiTError, match="even"):
        pair[False][1](lat, sigma, ctx, pooled)
