"""Finetuning from a (tiny, diffusers-saved) SD3 pipeline folder: the run starts from its weights, the
workdir becomes a pipeline folder every loader reads (transformer from the checkpoint, VAE and text
encoders linked from the base), and the sample grid is written."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import mmdit_jax as mj
import train_fake
from mmdit_jax.training import register_data_factory
from mmdit_jax.training.config import CheckpointConfig, EMAConfig, LogConfig, ModelConfig, OptimConfig
from mmdit_jax.training.loop import train
from test_pipeline_components import PROMPTS, _sd3


@pytest.mark.slow
def test_finetune_from_pipeline_folder_writes_a_loadable_workdir_and_grid(tmp_path):
    pipe = _sd3(tmp_path)
    base = str(tmp_path / "pipe")
    pipe.save_pretrained(base)
    register_data_factory("fake_pipe", lambda d, *, batch_size, seed, process_index, **kw:
                          train_fake.FakeTrainData(batch_size, seed, process_index, context_dim=64,
                                                   pooled_dim=56))
    cfg = train_fake.tiny_config(
        model=ModelConfig(pretrained=base, compute_dtype="float32"), data_factory="fake_pipe",
        # a vanishing learning rate and no EMA: the saved weights must still be the pretrained ones
        optim=OptimConfig(lr=1e-12, weight_decay=0.0), ema=EMAConfig(decay=0.0),
        checkpoint=CheckpointConfig(every=2, keep=1, async_save=False),
        log=LogConfig(every=1, val_every=0, sample_every=2, sample_prompts=tuple(PROMPTS[:2]), sample_steps=3,
                      sample_resolution=32),
        max_steps=2)
    work = str(tmp_path / "work")
    assert train(cfg, work) == 0

    grid = np.asarray(Image.open(os.path.join(work, "samples", "step_00000002.png")))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
    assert json.load(open(os.path.join(work, "transformer", "checkpoint.json")))["item"] == "params"
    ref = mj.load_transformer(base)
    got = mj.load_transformer(work)
    assert got.config == ref.config
    for x, y in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-9)
    # the VAE and text encoders come through the workdir too
    ctx, pooled = mj.load_text_encoders(work)(PROMPTS, max_sequence_length=20)
    ctx_b, pooled_b = mj.load_text_encoders(base)(PROMPTS, max_sequence_length=20)
    np.testing.assert_array_equal(np.asarray(ctx), np.asarray(ctx_b))
    z = np.random.default_rng(0).standard_normal((1, 4, 6, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(mj.load_vae(work).decode(z)), np.asarray(mj.load_vae(base).decode(z)))
    # and the workdir samples like the base it was trained from (checkpoints sample through
    # the sampler): same weights, scheduler config linked from the base
    lat = np.random.default_rng(1).standard_normal((1, 8, 8, 16)).astype(np.float32)  # default size
    kw = dict(num_inference_steps=2, guidance_scale=2.0, latents=lat, output_type="np", max_sequence_length=20)
    np.testing.assert_allclose(mj.Pipeline.from_pretrained(work)(PROMPTS[0], **kw),
                               mj.Pipeline.from_pretrained(base)(PROMPTS[0], **kw), rtol=0, atol=1e-6)
