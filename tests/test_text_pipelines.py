"""`mj.load_text_encoders(folder)` against diffusers' `encode_prompt` on tiny saved SD3 / FLUX pipelines."""
import numpy as np
import pytest

from conftest import max_rel_err
from text_tiny import clip_model, make_t5_tokenizer, t5_model, write_clip_tokenizer

CLIP_LEN = 16
PROMPTS = ["a photo of a cat",
           "the big red dog on the blue mat under the sky " * 3,  # longer than every max length
           "",
           "sky"]


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=1, sample_size=16)


def _tokenizers(tmp_path):
    tok_l, vocab = write_clip_tokenizer(str(tmp_path / "tok_l"), CLIP_LEN)
    # OpenCLIP-G's tokenizer pads with "!" instead of EOS
    tok_g, _ = write_clip_tokenizer(str(tmp_path / "tok_g"), CLIP_LEN, pad_token="!")
    tok_t5, t5_vocab = make_t5_tokenizer()
    return tok_l, tok_g, tok_t5, vocab, t5_vocab


def _sd3_pipeline(tmp_path, with_t5: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok_l, tok_g, tok_t5, vocab, t5_vocab = _tokenizers(tmp_path)
    # the real CLIP-L/G configs keep eos_token_id 2 (argmax pooling); the tokenizer's EOS is the top id
    te = clip_model(vocab, width=32, heads=4, projection=32, eos=2, seed=1)
    te2 = clip_model(vocab, width=48, heads=4, layers=2, act="gelu", projection=48, eos=2, seed=2)
    te3 = t5_model(t5_vocab, d_model=96, seed=3) if with_t5 else None
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=16, pooled_projection_dim=80, out_channels=4,
                                        pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=te, tokenizer=tok_l, text_encoder_2=te2, tokenizer_2=tok_g,
        text_encoder_3=te3, tokenizer_3=tok_t5 if with_t5 else None)


def _flux_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok_l, _, tok_t5, vocab, t5_vocab = _tokenizers(tmp_path)
    te = clip_model(vocab, width=32, heads=4, eos=2, seed=4)
    te2 = t5_model(t5_vocab, d_model=48, seed=5)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                        text_encoder=te, tokenizer=tok_l, text_encoder_2=te2, tokenizer_2=tok_t5)


def _compare(got, want, tol=1e-5):
    got, want = np.asarray(got), want.detach().numpy()
    assert got.shape == want.shape
    assert max_rel_err(got, want) < tol


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_encode_prompt(tmp_path, with_t5):
    import torch

    import mmdit_jax as mj

    pipe = _sd3_pipeline(tmp_path, with_t5)
    pipe.save_pretrained(tmp_path / "pipe")
    enc = mj.load_text_encoders(tmp_path / "pipe")
    for n in (12, None):  # 12 truncates the long prompt; None is the pipeline's default 256
        with torch.no_grad():
            kw = {} if n is None else {"max_sequence_length": n}
            ctx, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, **kw)
        got_ctx, got_pooled = enc(PROMPTS, max_sequence_length=n)
        assert ctx.shape == (len(PROMPTS), CLIP_LEN + (n or 256), 96)
        _compare(got_ctx, ctx)
        _compare(got_pooled, pooled)
        if not with_t5:
            assert not np.asarray(got_ctx[:, CLIP_LEN:]).any()
        # the CLIP part is padded from 80 to 96 channels with zeros
        assert not np.asarray(got_ctx[:, :CLIP_LEN, 80:]).any()


def test_flux_encode_prompt(tmp_path):
    import torch

    import mmdit_jax as mj

    pipe = _flux_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    enc = mj.load_text_encoders(tmp_path / "pipe")
    # the oracle runs in float64: at 512 T5 tokens torch's own float32 rounding (6e-6 of the output scale
    # from float64, as large as ours) would take half the tolerance
    pipe.text_encoder.double()
    pipe.text_encoder_2.double()
    for n in (10, None):  # None: the pipeline's default 512
        with torch.no_grad():
            kw = {} if n is None else {"max_sequence_length": n}
            ctx, pooled, _ = pipe.encode_prompt(PROMPTS, None, **kw)
        got_ctx, got_pooled = enc(PROMPTS, max_sequence_length=n)
        assert got_ctx.shape == (len(PROMPTS), n or 512, 48)
        _compare(got_ctx, ctx)
        _compare(got_pooled, pooled)
    # one prompt (a string) works and matches the batched row
    one_ctx, one_pooled = enc(PROMPTS[0], max_sequence_length=10)
    np.testing.assert_allclose(one_pooled[0], enc(PROMPTS, 10)[1][0], rtol=1e-5, atol=1e-6)
    assert one_ctx.shape == (1, 10, 48)


def test_load_text_encoders_errors(tmp_path):
    import mmdit_jax as mj

    with pytest.raises(mj.MMDiTError, match="pipeline folder"):
        mj.load_text_encoders(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(mj.MMDiTError, match="unsupported pipeline class"):
        mj.load_text_encoders(tmp_path)
