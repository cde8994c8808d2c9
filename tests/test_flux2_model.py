"""FLUX.2 transformer vs diffusers' Flux2Transformer2DModel on random tiny configs (float32 parity with
and without the guidance embedder, references of different sizes, non-square latents, batch 2; bf16
drift; input errors). Weights travel through a saved diffusers folder and `mj.load_transformer`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from flux2_oracle import TINY, inputs, reference, tiny_flux2
from flux_oracle import correctly_rounded_sinusoid


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{guidance: (torch oracle, loaded mmdit_jax Transformer)} for dev-style and klein-style."""
    out = {}
    for guidance in (True, False):
        ref = tiny_flux2(guidance, seed=int(guidance))
        folder = tmp_path_factory.mktemp(f"flux2_g{int(guidance)}")
        ref.save_pretrained(folder)
        out[guidance] = (ref, mj.load_transformer(folder))
    return out


def run(model, args):
    lat, sigma, ctx, g, refs = args
    return np.asarray(model(lat, sigma, ctx, None, g, references=refs or None))


@pytest.mark.parametrize("guidance,batch,h,w,text_len,refs", [
    (True, 2, 3, 5, 4, ((2, 3), (4, 2))),  # dev-style, non-square, two references of different sizes
    (True, 2, 4, 2, 6, ()),                # dev-style, tall, no reference
    (False, 2, 5, 3, 3, ((3, 3),)),        # klein-style, one reference
    (False, 1, 4, 4, 1, ((2, 5), (1, 1))), # square, a single text token, a one-token reference
])
def test_parity_float32(pair, guidance, batch, h, w, text_len, refs):
    ref, model = pair[guidance]
    assert model.config.family == "flux2" and model.config.guidance_embed == guidance
    args = inputs(np.random.default_rng(h * w + text_len), TINY, batch, h, w, text_len, guidance, refs)
    with correctly_rounded_sinusoid():
        want = reference(ref, *args)
    got = run(model, args)
    assert got.shape == (batch, h, w, TINY["in_channels"])
    err = max_rel_err(got, want)
    print(f"float32 parity guidance={guidance} {batch}x{h}x{w} text={text_len} refs={refs}: "
          f"max rel err {err:.2e}")
    assert err < 2e-5


def test_references_change_the_output(pair):
    """The reference tokens are attended to: dropping one changes the velocity (and diffusers agrees)."""
    ref, model = pair[False]
    args = inputs(np.random.default_rng(8), TINY, 2, 3, 4, 3, False, ((2, 2), (3, 2)))
    one = args[:4] + (args[4][:1],)
    got_two, got_one = run(model, args), run(model, one)
    assert max_rel_err(got_one, got_two) > 1e-3
    with correctly_rounded_sinusoid():
        assert max_rel_err(got_one, reference(ref, *one)) < 2e-5


def test_bfloat16_close_to_float32(pair):
    _, model32 = pair[True]
    model16 = mj.Transformer(model32.config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), model32.params),
                             "bfloat16")
    args = inputs(np.random.default_rng(3), TINY, 2, 3, 5, 4, True, ((2, 3),))
    out16 = np.asarray(model16(*args[:3], None, args[3], references=args[4]).astype(jnp.float32))
    err = max_rel_err(out16, run(model32, args))
    print(f"bfloat16 vs float32: max rel err {err:.2e}")
    assert np.isfinite(out16).all() and err < 5e-2


@pytest.mark.parametrize("arg,change,match", [
    (0, lambda lat: lat[..., :-1], "latents of shape"),            # wrong latent width
    (2, lambda ctx: ctx[..., :-1], "context of shape"),            # wrong text width
    (4, lambda refs: [refs[0][:1]], "references\\[0\\]"),         # a reference of another batch size
])
def test_bad_shapes_are_one_line_errors(pair, arg, change, match):
    _, model = pair[True]
    args = list(inputs(np.random.default_rng(0), TINY, 2, 3, 4, 2, True, ((2, 2),)))
    args[arg] = change(args[arg])
    with pytest.raises(mj.MMDiTError, match=match) as e:
        run(model, args)
    assert "\n" not in str(e.value)


def test_guidance_and_pooled_rules(pair):
    lat, sigma, ctx, g, _ = inputs(np.random.default_rng(0), TINY, 1, 2, 2, 2, True)
    with pytest.raises(mj.MMDiTError, match="guidance embedder"):
        pair[True][1](lat, sigma, ctx, None)  # dev without guidance
    with pytest.raises(mj.MMDiTError, match="no guidance embedder"):
        pair[False][1](lat, sigma, ctx, None, g)  # klein with guidance
    with pytest.raises(mj.MMDiTError, match="no pooled"):
        pair[False][1](lat, sigma, ctx, np.zeros((1, 4), np.float32))


def test_references_rejected_by_other_families():
    cfg = mj.FluxConfig(num_heads=2, head_dim=32, depth=1, depth_single=1, context_dim=8, pooled_dim=4,
                        axes_dim=(4, 14, 14), guidance_embed=False)
    model = mj.Transformer.init(cfg)
    lat = np.zeros((1, 2, 2, 16), np.float32)
    with pytest.raises(mj.MMDiTError, match="references are supported for FLUX.2"):
        model(lat, np.ones(1, np.float32), np.zeros((1, 2, 8), np.float32), np.zeros((1, 4), np.float32),
              references=[lat])
