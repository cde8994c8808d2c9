"""Orbax component folders: params/ (what mmdit-convert writes) and checkpoint.json pointers (what the
trainer's workdir exposes) restore exactly, with clear errors for damaged or mismatched checkpoints."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mmdit_jax as mj
from mmdit_jax.transformer import save_transformer
from sd3_oracle import tiny_config


def _model(**kw):
    """Random weights everywhere (the reference init zeroes adaLN and the output layer)."""
    model = mj.Transformer.init(mj.MMDiTConfig.from_diffusers(tiny_config(**kw)), seed=3)
    leaves, tree = jax.tree.flatten(model.params)
    r = np.random.default_rng(0)
    model.params = jax.tree.unflatten(tree, [x + 0.05 * r.standard_normal(x.shape).astype(np.float32)
                                             for x in leaves])
    return model


def _inputs(cfg, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((2, 6, 4, cfg.in_channels)).astype(np.float32)
    sigma = np.array([0.3, 0.9], np.float32)
    ctx = r.standard_normal((2, 5, cfg.context_dim)).astype(np.float32)
    pooled = r.standard_normal((2, cfg.pooled_dim)).astype(np.float32)
    return x, sigma, ctx, pooled


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_params_folder_round_trip_and_bf16(tmp_path):
    model = _model(dual_attention_layers=(1,), qk_norm="rms_norm")
    save_transformer(model, tmp_path / "t")
    assert not os.path.exists(tmp_path / "t.partial")
    back = mj.load_transformer(str(tmp_path / "t"))
    assert back.config == model.config
    _leaves_equal(back.params, model.params)
    inp = _inputs(model.config)
    ref = np.asarray(model(*inp))
    assert np.abs(ref).mean() > 1e-2  # a real output, not the zero-init one
    np.testing.assert_array_equal(np.asarray(back(*inp)), ref)
    half = mj.load_transformer(str(tmp_path / "t"), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(mj.MMDiTError, match="already exists"):
        save_transformer(model, tmp_path / "t")


def test_pipeline_folder_with_orbax_transformer(tmp_path):
    model = _model()
    os.makedirs(tmp_path / "p")
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    save_transformer(model, tmp_path / "p" / "transformer")
    _leaves_equal(mj.load_transformer(str(tmp_path / "p")).params, model.params)


def test_checkpoint_pointer_restores_newest_step(tmp_path):
    model = _model()
    later = jax.tree.map(lambda x: x + 1.0, model.params)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    for step, p in ((10, model.params), (20, later)):
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(p),
                                                 ema=ocp.args.StandardSave(jax.tree.map(lambda x: -x, p))))
    mngr.wait_until_finished()
    comp = tmp_path / "work" / "transformer"
    os.makedirs(comp)
    (comp / "config.json").write_text(json.dumps(model.config.to_diffusers()))
    (comp / "checkpoint.json").write_text(json.dumps({"directory": "../../ckpt", "item": "ema"}))
    _leaves_equal(mj.load_transformer(str(comp)).params, jax.tree.map(lambda x: -x, later))
    (comp / "checkpoint.json").write_text(json.dumps({"directory": "../../ckpt", "item": "params",
                                                      "step": 10}))
    _leaves_equal(mj.load_transformer(str(comp)).params, model.params)
    (comp / "checkpoint.json").write_text(json.dumps({"directory": "../../ckpt", "item": "nope"}))
    with pytest.raises(mj.MMDiTError, match="nope"):
        mj.load_transformer(str(comp))
    (comp / "checkpoint.json").write_text(json.dumps({"directory": "../../missing", "item": "ema"}))
    with pytest.raises(mj.MMDiTError, match="does not exist"):
        mj.load_transformer(str(comp))


def test_mismatched_and_damaged_checkpoints_fail_cleanly(tmp_path):
    model = _model()
    save_transformer(model, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["num_layers"] = cfg["num_layers"] + 1
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mj.MMDiTError, match="config needs|lacks"):
        mj.load_transformer(str(tmp_path / "t"))
    save_transformer(model, tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "params")
    os.makedirs(tmp_path / "d" / "params")
    with pytest.raises(mj.MMDiTError, match="not a readable Orbax checkpoint"):
        mj.load_transformer(str(tmp_path / "d"))


def test_folder_with_fused_kernels_as_plain_matrices_says_convert_again(tmp_path):
    """A params/ folder whose fused qkv kernels are stored merged, (..., in, 3 * width) as older versions
    wrote them, is refused with the remedy named, not a bare shape mismatch."""
    model = _model()
    save_transformer(model, tmp_path / "t")
    merged = jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(x).reshape(x.shape[:-2] + (-1,))
        if any(getattr(k, "key", None) == "qkv" for k in p) and x.ndim >= 3 else np.asarray(x), model.params)
    assert any(a.shape != b.shape for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(model.params)))
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "t" / "config.json", old / "config.json")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(old / "params"), merged)
    ckptr.wait_until_finished()
    with pytest.raises(mj.MMDiTError, match=r"qkv.* has shape .*: convert it again from the safetensors source"):
        mj.load_transformer(str(old))
