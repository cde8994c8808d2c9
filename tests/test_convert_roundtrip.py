"""mmdit-convert round trips are bit-exact: diffusers -> Orbax -> diffusers (read back by diffusers'
own from_pretrained, sharded with an index) and original -> Orbax -> original (SAI SD3 file with its
VAE, BFL FLUX file; float32 and bfloat16), and diffusers' from_single_file reads the original export."""
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from convert_tiny import bfl_file_tensors, flux_pipeline, sai_file_tensors, sd3_pipeline
from mmdit_jax.conversion.export import export
from mmdit_jax.conversion.to_orbax import convert
from mmdit_jax.io.safetensors_io import TensorFile, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    pipe = sd3_pipeline(str(root))
    pipe.save_pretrained(str(root / "pipe"))
    return pipe, root


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    pipe = flux_pipeline(str(root))
    pipe.save_pretrained(str(root / "pipe"))
    return pipe, root


def _same_state(a, b, name):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), name
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_orbax_diffusers_is_bit_exact(family, sd3, flux, tmp_path):
    from diffusers import DiffusionPipeline

    pipe, root = sd3 if family == "sd3" else flux
    convert(str(root / "pipe"), str(tmp_path / "orbax"))
    # small shards so the index path is taken; diffusers and transformers read them back
    export(str(tmp_path / "orbax"), str(tmp_path / "back"), "diffusers", max_shard_bytes=60_000)
    assert os.path.isfile(tmp_path / "back" / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    back = DiffusionPipeline.from_pretrained(str(tmp_path / "back"))
    assert type(back) is type(pipe)
    for name in MODELS:
        if hasattr(pipe, name):
            _same_state(getattr(pipe, name), getattr(back, name), name)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.scheduler.config) == public(pipe.scheduler.config)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if hasattr(pipe, name):
            assert getattr(back, name)("a red cat").input_ids == getattr(pipe, name)("a red cat").input_ids


def _file_equal(a, b):
    fa, fb = TensorFile(a), TensorFile(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sai_file_orbax_sai_file_is_bit_exact(dtype, sd3, tmp_path):
    pipe, _ = sd3
    tensors = sai_file_tensors(pipe, with_text=False)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "sd3.safetensors"))
    convert(str(tmp_path / "sd3.safetensors"), str(tmp_path / "orbax"), dtype)
    export(str(tmp_path / "orbax"), str(tmp_path / "orig"), "original")
    assert sorted(os.listdir(tmp_path / "orig")) == ["sd3.safetensors"]
    _file_equal(str(tmp_path / "sd3.safetensors"), str(tmp_path / "orig" / "sd3.safetensors"))


def test_bfl_file_orbax_bfl_file_is_bit_exact(flux, tmp_path):
    pipe, _ = flux
    save_file(bfl_file_tensors(pipe), str(tmp_path / "flux1.safetensors"))
    convert(str(tmp_path / "flux1.safetensors"), str(tmp_path / "orbax"))
    index = json.loads((tmp_path / "orbax" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"] and index["vae"] == [None, None]
    export(str(tmp_path / "orbax"), str(tmp_path / "orig"), "original")
    _file_equal(str(tmp_path / "flux1.safetensors"), str(tmp_path / "orig" / "flux.safetensors"))


def test_diffusers_from_single_file_reads_the_original_export(sd3, tmp_path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    pipe, root = sd3
    convert(str(root / "pipe"), str(tmp_path / "orbax"), "bfloat16")
    export(str(tmp_path / "orbax"), str(tmp_path / "orig"), "original")
    path = str(tmp_path / "orig" / "sd3.safetensors")
    assert TensorFile(path)["model.diffusion_model.pos_embed"].dtype == ml_dtypes.bfloat16
    tr = SD3Transformer2DModel.from_single_file(path, config=str(root / "pipe"), subfolder="transformer",
                                                torch_dtype=torch.float32)
    vae = AutoencoderKL.from_single_file(path, config=str(root / "pipe"), subfolder="vae",
                                         torch_dtype=torch.float32)
    for name, got in (("transformer", tr), ("vae", vae)):
        ref = getattr(pipe, name).state_dict()
        st = got.state_dict()
        assert sorted(st) == sorted(ref)
        for k in ref:  # what the bf16 checkpoint holds: the reference rounded once
            assert torch.equal(st[k], ref[k].to(torch.bfloat16).float()), (name, k)


def test_export_of_a_guidance_distilled_sd3_says_what_the_references_cannot_read(sd3, tmp_path):
    """The student's guidance embedder has no counterpart in diffusers' or SAI's SD3: the export keeps it
    (mmdit-jax reads it back, bit for bit) and says so, rather than leaving a file that silently loads
    as an undistilled model elsewhere."""
    import dataclasses

    import mmdit_jax as mj
    from mmdit_jax.training.modes import with_guidance_embedder

    _, root = sd3
    convert(str(root / "pipe" / "transformer"), str(tmp_path / "teacher"))
    teacher = mj.load_transformer(str(tmp_path / "teacher"))
    assert export(str(tmp_path / "teacher"), str(tmp_path / "plain"), "diffusers")["notes"] == []
    cfg = dataclasses.replace(teacher.config, guidance_embed=True)
    student = mj.Transformer(cfg, with_guidance_embedder(cfg, teacher.params, 0))
    mj.save_transformer(student, str(tmp_path / "student"))
    notes = export(str(tmp_path / "student"), str(tmp_path / "diffusers"), "diffusers")["notes"]
    assert len(notes) == 1 and "g_embedder" in notes[0] and "only mmdit-jax" in notes[0], notes
    res = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "convert.py"), f"--src={tmp_path}/student",
                          f"--out={tmp_path}/original", "--to=original"], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "mmdit-convert: note: transformer:" in res.stdout and "Stability AI's sd3 code" in res.stdout, res.stdout
    back = mj.load_transformer(str(tmp_path / "diffusers"))
    assert back.config.guidance_embed
    for a, b in zip(jax.tree.leaves(student.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
