"""LoRA training on a tiny FLUX.1-dev transformer (double and single blocks, every linear incl.
modulation): the WORKDIR/lora file loads in diffusers' `load_lora_weights` with the same effect."""
import os

import jax
import numpy as np
import pytest

import flux_oracle
import mmdit_jax as mj
import train_fake
from conftest import max_rel_err
from lora_oracle import flux_pipeline
from mmdit_jax import lora as L
from mmdit_jax.training import register_data_factory
from mmdit_jax.lora import LoraConfig
from mmdit_jax.training.config import (CheckpointConfig, EMAConfig, LogConfig, LoraTrainConfig, LossConfig,
                                       ModelConfig, OptimConfig)
from mmdit_jax.training.loop import train
from mmdit_jax.training.modes import LORA_DIR, LORA_FILE

register_data_factory("fake_flux", lambda d, *, batch_size, seed, process_index, **kw: train_fake.FakeTrainData(
    batch_size, seed, process_index, context_dim=flux_oracle.TINY["joint_attention_dim"],
    pooled_dim=flux_oracle.TINY["pooled_projection_dim"]))


@pytest.mark.slow
def test_trained_flux_lora_loads_in_diffusers_with_the_same_effect(tmp_path):
    from diffusers import FluxTransformer2DModel

    folder = str(tmp_path / "base")
    flux_oracle.tiny_flux(True, seed=4, std=0.1).save_pretrained(folder)
    cfg = train_fake.tiny_config(
        model=ModelConfig(pretrained=folder, compute_dtype="float32"), data_factory="fake_flux",
        lora=LoraTrainConfig(enabled=True, adapter=LoraConfig(rank=2, alpha=4.0, targets="all", blocks=(1,),
                                                              single_blocks=(0,)), format="kohya"),
        loss=LossConfig(encoder_dropout=0.0, guidance=3.5), optim=OptimConfig(lr=3e-2, warmup_steps=0, clip_norm=0.0),
        ema=EMAConfig(decay=0.0), checkpoint=CheckpointConfig(every=3, keep=1, async_save=False),
        log=LogConfig(every=1, val_every=0), max_steps=3)
    work = str(tmp_path / "work")
    assert train(cfg, work) == 0
    path = os.path.join(work, LORA_DIR, LORA_FILE)
    model = mj.load_transformer(folder)
    lora = L.load_lora(path, model)
    kohya = L.load_lora(os.path.join(work, LORA_DIR, "lora_kohya.safetensors"), model)
    args = flux_oracle.inputs(np.random.default_rng(0), flux_oracle.TINY, 2, 4, 6, 5, True)
    ours = jax.jit(lambda p, lo: L.apply_lora(model, p, lo, *args))
    got = np.asarray(ours(model.params, lora))
    ref = FluxTransformer2DModel.from_pretrained(folder).eval()
    with flux_oracle.correctly_rounded_sinusoid():
        before = flux_oracle.reference(ref, *args)
        flux_pipeline(ref).load_lora_weights(path)
        want = flux_oracle.reference(ref, *args)
    err = max_rel_err(got, want)
    print(f"trained FLUX LoRA via diffusers load_lora_weights: max rel err {err:.2e} "
          f"(LoRA moves the output by {max_rel_err(want, before):.3f})")
    assert err < 1e-5 and max_rel_err(want, before) > 1e-2
    assert max_rel_err(np.asarray(ours(model.params, kohya)), got) < 1e-6  # the kohya twin: same adapter
