"""LoRA training with mmdit-train on a tiny diffusers-saved SD3 transformer: the file written to
WORKDIR/lora loads in diffusers' `load_lora_weights` and changes its output exactly as ours; only the
adapters are in the optimizer state; a run of N steps and one of N/2 + resume give identical adapters."""
import os

import jax
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
from mmdit_jax.io.safetensors_io import TensorFile
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.config import (CheckpointConfig, EMAConfig, LogConfig, LoraTrainConfig, ModelConfig,
                                       OptimConfig,
                                       apply_overrides, validate)
from mmdit_jax.training.loop import train
from mmdit_jax.training.modes import LORA_DIR, LORA_FILE, TrainMode
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state

# 2 blocks, QK-norm, a dual-attention block; text sizes as train_fake's batches
TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=16,
            pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
LORA = LoraTrainConfig(enabled=True, adapter=L.LoraConfig(rank=3, alpha=5.0, dropout=0.1, targets="attn_mlp"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("lora_train")
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))  # the runs compile one program
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    folder = root / "base"
    randomize_torch_(SD3Transformer2DModel(**TINY).eval(), std=0.1, seed=3,
                     buffers=("pos_embed.pos_embed",)).save_pretrained(folder)
    return root, str(folder)


def _cfg(folder, max_steps):
    return train_fake.tiny_config(
        model=ModelConfig(pretrained=folder, compute_dtype="float32"), lora=LORA, ema=EMAConfig(decay=0.0),
        optim=OptimConfig(lr=3e-2, warmup_steps=0, clip_norm=0.0),  # adapters move visibly in 4 steps
        checkpoint=CheckpointConfig(every=2, keep=2, async_save=False), log=LogConfig(every=1, val_every=2),
        max_steps=max_steps)


@pytest.fixture(scope="module")
def runs(base):
    """(full, half, exports): `exports` is the full run's LoRA file read back after each export, with the
    step it was written at."""
    root, folder = base
    full, half = str(root / "full"), str(root / "half")
    exports, export = [], TrainMode.export

    def recording(self, state, workdir, model):
        path = export(self, state, workdir, model)
        if os.path.abspath(workdir) == os.path.abspath(full):
            f = TensorFile(path)
            exports.append((int(state.step), {k: np.asarray(f[k]) for k in f.keys()}))
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainMode, "export", recording)
        assert train(_cfg(folder, 4), full) == 0
    assert train(_cfg(folder, 2), half) == 0
    assert train(_cfg(folder, 4), half) == 0  # resumes from step 2
    return full, half, exports


def test_lora_file_is_rewritten_at_every_checkpoint(runs):
    full, _, exports = runs
    # checkpoint.every = 2 (Orbax's manager also saves the first step it is given)
    assert [step for step, _ in exports] == [1, 2, 4]
    at2, at4 = exports[1][1], exports[2][1]
    assert sorted(at2) == sorted(at4)
    assert max(float(np.abs(at2[k] - at4[k]).max()) for k in at2) > 0  # the step-4 adapters replaced step 2's
    final = TensorFile(os.path.join(full, LORA_DIR, LORA_FILE))
    for k in at4:
        np.testing.assert_array_equal(np.asarray(final[k]), at4[k], err_msg=k)


def test_trained_file_loads_in_diffusers_with_the_same_effect(base, runs):
    root, folder = base
    path = os.path.join(runs[0], LORA_DIR, LORA_FILE)
    model = mj.load_transformer(folder)
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
    err = max_rel_err(got - before, want - before)  # relative to the change the LoRA makes
    print(f"trained SD3 LoRA via diffusers load_lora_weights: max rel err of the change {err:.2e}, "
          f"output {max_rel_err(got, want):.2e}")
    assert max_rel_err(got, want) < 1e-5 and err < 1e-4
    assert max_rel_err(want, before) > 1e-2
    # the workdir samples as the base: its transformer is the base's
    assert mj.load_transformer(runs[0]).config == model.config


def test_resume_gives_identical_adapters(runs):
    a = TensorFile(os.path.join(runs[0], LORA_DIR, LORA_FILE))
    b = TensorFile(os.path.join(runs[1], LORA_DIR, LORA_FILE))
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_only_adapters_are_optimised(base):
    _, folder = base
    cfg = _cfg(folder, 4).replace(lora=LORA.__class__(**{**LORA.__dict__, "base_dtype": "bfloat16"}))
    model = mj.load_transformer(folder)
    mode = TrainMode(cfg, model.config)
    tx = make_optimizer(cfg.optim, 4, mode.trainable_mask(model))
    mesh = make_mesh({"fsdp": -1})
    state, _ = create_state(model, tx, mesh, 0, False, mode=mode)
    n_lora = mode.lora_of(state.params).num_params()
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert n_opt == 2 * n_lora  # Adam's two moments of the adapters, nothing of the base
    assert n_lora < mj.count_params(model.config) / 5
    frozen, _ = mode.frozen(model.params, None, model, mesh)
    assert {x.dtype for x in jax.tree.leaves(frozen) if x.ndim > 1} == {jax.numpy.dtype("bfloat16")}


def test_bad_lora_settings_fail_with_their_key(base):
    _, folder = base
    cfg = _cfg(folder, 4)
    for item, key in (("lora.targets=everything", "lora.targets"), ("lora.rank=0", "lora.rank"),
                      ("lora.base_dtype=int8", "lora.base_dtype"), ("model.pretrained=none", "model.preset")):
        with pytest.raises(MMDiTError, match=f"--set={key}"):
            validate(apply_overrides(cfg, [item]))
    model = mj.load_transformer(folder)
    with pytest.raises(MMDiTError, match="--set=lora.blocks: .*blocks \\[5\\]"):
        TrainMode(apply_overrides(cfg, ["lora.blocks=0,5"]), model.config)
