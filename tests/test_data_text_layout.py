"""`text_layout`: where each text encoder's output lies in (context, pooled), checked against diffusers'
per-encoder prompt functions on tiny SD3 and FLUX-dev pipelines; zeroing SD3's T5 segment equals
encoding with a pipeline that has no T5."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import max_rel_err
from data_tiny import flux_pipeline, save, sd3_pipeline
from mmdit_jax.data.encode import load_encoders

PROMPTS = ["blue sky over a red cat", "a dog", "the mat under the sky " * 3]
N_SEQ = 7


def _covered(shape, segments, part):
    mask = np.zeros(shape, bool)
    for s in segments:
        if part == "context":
            mask[:, s.rows, s.channels] = True
        else:
            mask[:, s.pooled] = True
    return mask


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    pipe = sd3_pipeline(str(tmp))
    return pipe, save(pipe, str(tmp / "pipe"))


def test_sd3_segments_hold_each_encoder(sd3, tmp_path):
    pipe, folder = sd3
    enc = load_encoders(folder, max_sequence_length=N_SEQ)
    context, pooled = enc.encode_text(PROMPTS)
    assert [s.name for s in enc.text_layout] == ["clip_l", "clip_g", "t5"]
    with torch.no_grad():
        parts = {"clip_l": pipe._get_clip_prompt_embeds(PROMPTS, clip_model_index=0),
                 "clip_g": pipe._get_clip_prompt_embeds(PROMPTS, clip_model_index=1),
                 "t5": (pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=N_SEQ), None)}
    for seg in enc.text_layout:
        ctx_ref, pooled_ref = parts[seg.name]
        assert max_rel_err(context[:, seg.rows, seg.channels], ctx_ref.numpy()) < 1e-5, seg.name
        if pooled_ref is None:
            assert seg.pooled.stop - seg.pooled.start == 0
        else:
            assert max_rel_err(pooled[:, seg.pooled], pooled_ref.numpy()) < 1e-5, seg.name
    # outside the segments: the zero padding of the CLIP channels up to the T5 width
    mask = _covered(context.shape, enc.text_layout, "context")
    assert (~mask).any() and np.all(context[~mask] == 0)
    assert _covered(pooled.shape, enc.text_layout, "pooled").all()

    # a pipeline without T5 encodes exactly the full encoding with the T5 segment zeroed
    bare = sd3_pipeline(str(tmp_path), with_t5=False)
    folder_no_t5 = save(bare, str(tmp_path / "no_t5"))
    os.makedirs(os.path.join(folder_no_t5, "transformer"), exist_ok=True)
    with open(os.path.join(folder_no_t5, "transformer", "config.json"), "w") as f:  # sets the T5 width
        json.dump({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": context.shape[-1]}, f)
    enc_no_t5 = load_encoders(folder_no_t5, max_sequence_length=N_SEQ)
    assert [s.name for s in enc_no_t5.text_layout] == ["clip_l", "clip_g"]
    dropped = context.copy()
    t5 = enc.text_layout[2]
    dropped[:, t5.rows, t5.channels] = 0
    ctx2, pooled2 = enc_no_t5.encode_text(PROMPTS)
    np.testing.assert_array_equal(ctx2, dropped)
    np.testing.assert_array_equal(pooled2, pooled)


def test_flux_segments_hold_each_encoder(tmp_path):
    pipe = flux_pipeline(str(tmp_path))
    enc = load_encoders(save(pipe, str(tmp_path / "pipe")), max_sequence_length=N_SEQ)
    context, pooled = enc.encode_text(PROMPTS)
    clip, t5 = enc.text_layout
    assert (clip.name, t5.name) == ("clip", "t5")
    with torch.no_grad():
        pooled_ref = pipe._get_clip_prompt_embeds(PROMPTS).numpy()
        ctx_ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=N_SEQ).numpy()
    assert max_rel_err(pooled[:, clip.pooled], pooled_ref) < 1e-5
    assert max_rel_err(context[:, t5.rows, t5.channels], ctx_ref) < 1e-5
    assert context[:, clip.rows, clip.channels].size == 0 and pooled[:, t5.pooled].size == 0
    assert _covered(context.shape, enc.text_layout, "context").all()
    assert _covered(pooled.shape, enc.text_layout, "pooled").all()
