"""Toy tokenizers, the pixel-space VAE, and toy pipeline folders read by the public loaders and by the
PyTorch references (transformers text encoders, diffusers transformers and prompt encoding)."""
import json
import os

import jax
import numpy as np
import pytest

import mmdit_jax as mj
from conftest import max_rel_err
from mmdit_jax.errors import MMDiTError
from mmdit_jax.text.tokenizers import load_tokenizer, tokenize
from mmdit_jax.toy import dataset, tokenizers
from mmdit_jax.toy.components import read_toy_config, toy_config, write_toy_pipeline, write_transformer
from mmdit_jax.vae.pixel import PixelSpaceConfig, PixelSpaceVAE

PROMPTS = ["a large red circle on the left", "a small purple diamond in the bottom right", ""]


def test_tokenizers_cover_the_vocabulary(tmp_path):
    words = dataset.vocabulary()
    tokenizers.write_clip_tokenizer(str(tmp_path / "clip"), words, 16)
    tokenizers.write_clip_tokenizer(str(tmp_path / "clip_g"), words, 16, pad_token="!")
    tokenizers.write_t5_tokenizer(str(tmp_path / "t5"), words)
    clip = load_tokenizer(str(tmp_path), "clip", "CLIPTokenizer")
    clip_g = load_tokenizer(str(tmp_path), "clip_g", "CLIPTokenizer")
    t5 = load_tokenizer(str(tmp_path), "t5", "T5TokenizerFast")
    eos = clip.convert_tokens_to_ids(tokenizers.CLIP_EOS)
    assert eos == max(clip.get_vocab().values())  # argmax pooling finds EOS
    for caption in dataset.all_captions():
        n = len(caption.split())
        ids = clip(caption).input_ids
        assert len(ids) == n + 2 and ids[-1] == eos  # BOS, one token per word, EOS
        assert clip.decode(ids, skip_special_tokens=True).strip() == caption
        ids5 = t5(caption).input_ids
        assert len(ids5) == n + 1 and t5.unk_token_id not in ids5  # one piece per word, </s>
        assert t5.decode(ids5, skip_special_tokens=True) == caption
    ids = tokenize(clip, PROMPTS[:1], 16)[0]
    ids_g = tokenize(clip_g, PROMPTS[:1], 16)[0]
    n = len(PROMPTS[0].split()) + 2
    assert (ids[n:] == eos).all() and (ids_g[n:] == clip_g.convert_tokens_to_ids("!")).all()
    # other text still encodes (byte fallback / letters), without crashing
    assert len(clip("zebra!").input_ids) > 2 and t5.unk_token_id not in t5("zebra").input_ids


def test_pixel_vae_is_exactly_invertible():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
    vae = PixelSpaceVAE(PixelSpaceConfig(factor=2))
    z = np.asarray(vae.encode(x))
    assert z.shape == (2, 4, 6, 12) and vae.config.latent_channels == 12 and vae.config.downsample_factor == 2
    # channel layout (dy, dx, c), c fastest
    for dy in range(2):
        for dx in range(2):
            np.testing.assert_array_equal(z[..., (2 * dy + dx) * 3:(2 * dy + dx + 1) * 3], x[:, dy::2, dx::2])
    np.testing.assert_array_equal(np.asarray(vae.decode(z)), x)
    scaled = PixelSpaceVAE(PixelSpaceConfig(factor=4, scaling_factor=0.7, shift_factor=0.1))
    x8 = x[:, :8, :8]
    zs = np.asarray(scaled.encode(x8))
    ref = np.empty((2, 2, 2, 48), np.float32)
    for i in range(2):
        for j in range(2):
            ref[:, i, j] = x8[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, 48)  # rows, cols, channels
    np.testing.assert_allclose(zs, (ref - 0.1) * 0.7, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(scaled.decode(zs)), x8, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(scaled.encode_apply({}, x8)), zs)
    with pytest.raises(MMDiTError, match="multiples of 4"):
        scaled.encode(x[:, :6])
    with pytest.raises(MMDiTError, match="latents must be"):
        vae.decode(x)


def test_pixel_vae_config_loading(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    cfg = PixelSpaceConfig(factor=2, scaling_factor=0.5, shift_factor=-0.25)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    vae = mj.load_vae(str(folder))
    assert isinstance(vae, PixelSpaceVAE) and vae.config == cfg and vae.params == {}
    (folder / "config.json").write_text(json.dumps({**cfg.to_diffusers(), "latent_channels": 16}))
    with pytest.raises(MMDiTError, match="latent_channels"):
        mj.load_vae(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg.to_diffusers(), "factor": "two"}))
    with pytest.raises(MMDiTError, match="PixelSpaceVAE"):
        mj.load_vae(str(folder))


def _write(tmp_path, variant):
    folder = str(tmp_path / variant)
    cfg = toy_config(variant, layers=2, single_layers=1, clip_length=12, max_sequence_length=12)
    write_toy_pipeline(folder, config=cfg, seed=5)
    return folder, cfg


@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_toy_pipeline_loads_through_the_contract(tmp_path, variant):
    folder, cfg = _write(tmp_path, variant)
    assert read_toy_config(folder) == cfg
    assert sorted(os.listdir(tmp_path)) == [variant]  # nothing left aside
    with pytest.raises(MMDiTError, match="not empty"):
        write_toy_pipeline(folder, config=cfg)
    enc = mj.load_text_encoders(folder)
    ctx, pooled = enc(PROMPTS, max_sequence_length=cfg.max_sequence_length)
    # SD3: CLIP tokens (both CLIPs side by side on channels) then T5 tokens; FLUX: T5 tokens only
    n_ctx = (cfg.clip_length if variant == "sd3" else 0) + cfg.max_sequence_length
    assert ctx.shape == (3, n_ctx, cfg.t5_width)
    assert pooled.shape == (3, 2 * cfg.clip_width if variant == "sd3" else cfg.clip_width)
    assert np.abs(np.asarray(ctx[0] - ctx[1])).max() > 1e-3  # captions give different features
    vae = mj.load_vae(folder)
    images = np.stack([dataset.ToyShapes()[i]["image"] for i in range(3)]).astype(np.float32) / 127.5 - 1
    lat = vae.encode(images)
    assert lat.shape == (3, 16, 16, 12)
    np.testing.assert_array_equal(np.asarray(vae.decode(lat)), images)
    model = mj.load_transformer(folder)
    assert model.config == cfg.transformer_config()
    v = model(lat, np.array([0.9, 0.5, 0.1], np.float32), ctx, pooled)
    assert v.shape == lat.shape and np.isfinite(np.asarray(v)).all()
    write_toy_pipeline(folder, config=cfg, seed=6, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [variant]
    other = mj.load_transformer(folder)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(other.params)))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_toy_pipeline_in_the_pytorch_references(tmp_path, variant):
    """transformers and diffusers read the toy text encoders, tokenizers, scheduler and transformer, and
    their prompt encoding and velocity equal ours (diffusers has no pixel-space VAE: vae=None)."""
    import torch
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, \
        SD3Transformer2DModel, StableDiffusion3Pipeline

    folder, cfg = _write(tmp_path, variant)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(p("scheduler"))
    tok = lambda name, cls: getattr(transformers, cls).from_pretrained(p(name))  # noqa: E731
    L = cfg.max_sequence_length
    if variant == "sd3":
        te = lambda name: transformers.CLIPTextModelWithProjection.from_pretrained(p(name)).eval()  # noqa: E731
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel.from_pretrained(p("transformer")).eval(), scheduler=sched,
            vae=None, text_encoder=te("text_encoder"), tokenizer=tok("tokenizer", "CLIPTokenizer"),
            text_encoder_2=te("text_encoder_2"), tokenizer_2=tok("tokenizer_2", "CLIPTokenizer"),
            text_encoder_3=transformers.T5EncoderModel.from_pretrained(p("text_encoder_3")).eval(),
            tokenizer_3=tok("tokenizer_3", "T5TokenizerFast"))
        with torch.no_grad():
            ctx_ref, _, pooled_ref, _ = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=L,
                                                           do_classifier_free_guidance=False)
    else:
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel.from_pretrained(p("transformer")).eval(), scheduler=sched, vae=None,
            text_encoder=transformers.CLIPTextModel.from_pretrained(p("text_encoder")).eval(),
            tokenizer=tok("tokenizer", "CLIPTokenizer"),
            text_encoder_2=transformers.T5EncoderModel.from_pretrained(p("text_encoder_2")).eval(),
            tokenizer_2=tok("tokenizer_2", "T5TokenizerFast"))
        with torch.no_grad():
            ctx_ref, pooled_ref, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=L)
    ctx, pooled = mj.load_text_encoders(folder)(PROMPTS, max_sequence_length=L)
    assert max_rel_err(ctx, ctx_ref.numpy()) < 1e-5 and max_rel_err(pooled, pooled_ref.numpy()) < 1e-5

    # a trained-looking network: the init's zero output layers would make any comparison trivial
    model = mj.load_transformer(folder)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(np.float32),
                          model.params)
    write_transformer(p("transformer"), model.config, params=params)
    model = mj.load_transformer(folder)
    ref_cls = SD3Transformer2DModel if variant == "sd3" else FluxTransformer2DModel
    ref = ref_cls.from_pretrained(p("transformer")).eval()
    lat = rng.standard_normal((3, 16, 12, 12)).astype(np.float32)
    sigma = np.array([1.0, 0.5, 0.2], np.float32)
    v = np.asarray(model(lat, sigma, ctx, pooled))
    with torch.no_grad():
        if variant == "sd3":
            v_ref = ref(hidden_states=torch.tensor(lat).permute(0, 3, 1, 2), encoder_hidden_states=ctx_ref,
                        pooled_projections=pooled_ref, timestep=torch.tensor(sigma) * 1000).sample
            v_ref = v_ref.permute(0, 2, 3, 1).numpy()
        else:
            packed = lat.reshape(3, 8, 2, 6, 2, 12).transpose(0, 1, 3, 5, 2, 4).reshape(3, 48, 48)
            ids = np.stack(np.meshgrid(np.arange(8), np.arange(6), indexing="ij"), -1).reshape(48, 2)
            ids = np.concatenate([np.zeros((48, 1)), ids], 1)
            out = ref(hidden_states=torch.tensor(packed), encoder_hidden_states=ctx_ref,
                      pooled_projections=pooled_ref, timestep=torch.tensor(sigma),
                      img_ids=torch.tensor(ids).float(), txt_ids=torch.zeros(L, 3)).sample.numpy()
            v_ref = out.reshape(3, 8, 6, 12, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(3, 16, 12, 12)
    assert max_rel_err(v, v_ref) < 2e-5, max_rel_err(v, v_ref)
