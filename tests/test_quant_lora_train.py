"""LoRA training on an int8-quantised frozen base (lora.base_quantize): the frozen tree holds int8 kernels,
and the trained file loads in diffusers on the float base with the effect ours has there."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mmdit_jax as mj
import sd3_oracle
import train_fake
from conftest import max_rel_err, randomize_torch_
from lora_oracle import sd3_pipeline
from mmdit_jax import lora as L
from mmdit_jax.errors import MMDiTError
from mmdit_jax.quant.model import quantize_transformer
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.config import (CheckpointConfig, EMAConfig, LogConfig, LoraTrainConfig, ModelConfig,
                                       OptimConfig, apply_overrides, validate)
from mmdit_jax.training.loop import train
from mmdit_jax.training.modes import LORA_DIR, LORA_FILE, TrainMode

TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=16,
            pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
LORA = LoraTrainConfig(enabled=True, adapter=L.LoraConfig(rank=3, alpha=5.0, targets="attn_mlp"),
                       base_dtype="float32", base_quantize="int8")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("quant_lora_train")
    folder = root / "base"
    randomize_torch_(SD3Transformer2DModel(**TINY).eval(), std=0.1, seed=5,
                     buffers=("pos_embed.pos_embed",)).save_pretrained(folder)
    return root, str(folder)


def _cfg(folder, max_steps, lora=LORA):
    return train_fake.tiny_config(
        model=ModelConfig(pretrained=folder, compute_dtype="float32"), lora=lora, ema=EMAConfig(decay=0.0),
        optim=OptimConfig(lr=3e-2, warmup_steps=0, clip_norm=0.0),
        checkpoint=CheckpointConfig(every=3, keep=1, async_save=False), log=LogConfig(every=1, val_every=0),
        max_steps=max_steps)


def test_frozen_base_is_int8(base):
    _, folder = base
    model = mj.load_transformer(folder)
    mode = TrainMode(_cfg(folder, 3), model.config)
    frozen, _ = mode.frozen_abstract(model, make_mesh({"data": 1}, jax.devices()[:1]))
    qkv = frozen["groups"][0]["blocks"]["x_block"]["attn"]["qkv"]
    assert qkv["kernel"].dtype == jnp.int8 and qkv["kernel_scale"].dtype == jnp.float32
    assert frozen["context_embedder"]["kernel"].dtype == jnp.float32  # embedders stay float
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    placed, _ = mode.frozen(model.params, None, model, mesh)  # quantised from the float base
    assert jax.tree.structure(placed) == jax.tree.structure(frozen)
    # what the trainer does: the base read quantised (never whole in float), then placed as it is
    read, _ = mode.frozen(mj.load_transformer(folder, "float32", quantize="int8").params, None, model, mesh)
    for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(placed)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_lora_trained_on_int8_base_loads_in_diffusers(base):
    root, folder = base
    work = str(root / "run")
    assert train(_cfg(folder, 3), work) == 0
    path = os.path.join(work, LORA_DIR, LORA_FILE)
    model = mj.load_transformer(folder)  # the float base
    lora = L.load_lora(path, model)
    assert all(np.abs(np.asarray(w["B"])).max() > 0 for _, _, w in lora.items())  # trained away from B = 0
    x = sd3_oracle.inputs(TINY, batch=2, h=6, w=4, text_len=5)
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(folder).eval()
    with torch.no_grad():
        before = sd3_oracle.torch_forward(ref, x)[1].numpy()
    sd3_pipeline(ref).load_lora_weights(path)
    with torch.no_grad():
        want = sd3_oracle.torch_forward(ref, x)[1].numpy()
    args = tuple(x[k] for k in ("latents", "sigma", "context", "pooled"))
    got = np.asarray(jax.jit(lambda p, lo: L.apply_lora(model, p, lo, *args))(model.params, lora))
    err = max_rel_err(got - before, want - before)
    print(f"\nLoRA trained on an int8 base, via diffusers load_lora_weights on the float base: max rel err "
          f"of the change {err:.2e}, output {max_rel_err(got, want):.2e}, change {max_rel_err(want, before):.2e}")
    assert max_rel_err(got, want) < 1e-5 and err < 1e-4
    assert max_rel_err(want, before) > 1e-2
    # on the int8 base it acts as on the float base, to within quantisation
    q = quantize_transformer(model, "int8")
    on_q = np.asarray(jax.jit(lambda p, lo: L.apply_lora(q, p, lo, *args))(q.params, lora))
    assert max_rel_err(on_q, got) < 3e-2


def test_bad_base_quantize_names_its_key(base):
    _, folder = base
    with pytest.raises(MMDiTError, match=r"lora\.base_quantize"):
        validate(apply_overrides(_cfg(folder, 3), ["lora.base_quantize=int4"]))
    validate(_cfg(folder, 3, dataclasses.replace(LORA, base_quantize=None)))
