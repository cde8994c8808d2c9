"""Bad checkpoints give one clear MMDiTError naming the file and the problem."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mmdit_jax as mj
from mmdit_jax.io.safetensors_io import TensorFile, save_file as save_np
from sd3_oracle import tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3")
    tiny_model(num_layers=2, qk_norm="rms_norm").save_pretrained(d)
    return d


def _edit(folder, tmp_path, fn):
    sd = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    fn(sd)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file(sd, str(out / "diffusion_pytorch_model.safetensors"))
    return str(out)


def test_missing_unexpected_and_misshaped_keys_in_one_error(folder, tmp_path):
    def edit(sd):
        del sd["transformer_blocks.0.attn.to_k.weight"]
        sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
        sd["proj_out.bias"] = torch.zeros(7)

    with pytest.raises(mj.MMDiTError) as e:
        mj.load_transformer(_edit(folder, tmp_path, edit))
    msg = str(e.value)
    assert "edited" in msg
    assert "missing keys (1): transformer_blocks.0.attn.to_k.weight" in msg
    assert "unexpected keys (1): transformer_blocks.0.attn.extra.weight" in msg
    assert "mis-shaped (1): proj_out.bias" in msg


def test_truncated_file_is_named(folder, tmp_path):
    src = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    data = open(src, "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(mj.MMDiTError, match="cut.safetensors: truncated"):
        mj.load_transformer(str(bad))


def test_garbage_and_missing_paths(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    with pytest.raises(mj.MMDiTError, match="junk.safetensors: not a safetensors file"):
        mj.load_transformer(str(junk))
    with pytest.raises(mj.MMDiTError, match="no such file or folder"):
        mj.load_transformer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(mj.MMDiTError, match="not a diffusers pipeline or component folder"):
        mj.load_transformer(str(tmp_path / "empty"))


def test_unknown_family(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(mj.MMDiTError, match="cannot tell the model family"):
        mj.load_transformer(str(path))
    cfg = tmp_path / "comp"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file({"a": torch.zeros(1)}, str(cfg / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(mj.MMDiTError, match="unknown model class 'UNet2DConditionModel'"):
        mj.load_transformer(str(cfg))


def test_diffusers_config_over_original_keys(folder, tmp_path):
    """A diffusers config.json beside weights in SAI's key layout is refused by name, not loaded."""
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file({"x_embedder.proj.weight": torch.zeros(4, 16, 2, 2),
               "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(12, 4)},
              str(out / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(mj.MMDiTError, match="not in the diffusers SD3Transformer2DModel key layout"):
        mj.load_transformer(str(out))


def test_bad_dtype(folder):
    with pytest.raises(mj.MMDiTError, match="dtype 'float16' not supported"):
        mj.load_transformer(str(folder), dtype="float16")


def test_safetensors_reader_round_trip_with_bfloat16(tmp_path):
    import ml_dtypes

    arrs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16), "c": np.zeros((0, 4), np.float32)}
    save_np(arrs, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    f = TensorFile(str(tmp_path / "t.safetensors"))
    assert f.metadata == {"format": "pt"}
    for k, v in arrs.items():
        np.testing.assert_array_equal(np.asarray(f[k]), v)
        assert f[k].dtype == v.dtype
    # torch's reader agrees with our writer
    t = load_file(str(tmp_path / "t.safetensors"))
    assert t["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(t["b"].float().numpy(), arrs["b"].astype(np.float32))


class _Exploit:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickles_load_weights_only_and_refuse_code(folder, tmp_path):
    sd = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    comp = tmp_path / "pt"
    comp.mkdir()
    (comp / "config.json").write_text((folder / "config.json").read_text())
    torch.save(sd, str(comp / "diffusion_pytorch_model.bin"))
    a, b = mj.load_transformer(str(comp)), mj.load_transformer(str(folder))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": _Exploit(str(marker))}}, str(evil))
    with pytest.raises(mj.MMDiTError, match="evil.ckpt: refused or unreadable PyTorch checkpoint"):
        mj.load_transformer(str(evil))
    assert not marker.exists()
