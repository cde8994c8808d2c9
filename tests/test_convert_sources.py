"""Every source form converts to an Orbax folder whose components load through the public loaders with
the same configs, bit-identical parameters and bit-identical outputs as the diffusers pipeline folder
they were made from (which tests/test_pipeline_components.py ties to diffusers itself)."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import mmdit_jax as mj
from convert_tiny import (bfl_file_tensors, flux_pipeline, ldm_vae, sai_file_tensors, save_torch_pickle,
                          sd3_pipeline)
from mmdit_jax.conversion.pipelines import SCHEDULERS
from mmdit_jax.conversion.to_orbax import convert
from mmdit_jax.io.safetensors_io import save_file

PROMPTS = ["a red cat on the mat", "blue sky"]
pytestmark = pytest.mark.slow


def _equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


class Reference:
    """Outputs of the public loaders on the diffusers pipeline folder."""

    def __init__(self, folder, family):
        self.folder, self.family = folder, family
        self.tr = mj.load_transformer(folder)
        self.vae = mj.load_vae(folder)
        self.ctx, self.pooled = mj.load_text_encoders(folder)(PROMPTS, max_sequence_length=9)
        r = np.random.default_rng(0)
        self.lat = r.standard_normal((2, 6, 4, 16)).astype(np.float32)
        self.sigma = np.array([0.9, 0.3], np.float32)
        self.guidance = np.array([3.5, 1.0], np.float32) if family == "flux" else None
        self.v = np.asarray(self.tr(self.lat, self.sigma, self.ctx, self.pooled, guidance=self.guidance))
        self.img = r.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
        self.z = np.asarray(self.vae.encode(self.img))
        self.x = np.asarray(self.vae.decode(self.z))

    def check_transformer(self, out, single_file=False):
        tr = mj.load_transformer(out)
        cfg = tr.config
        if single_file and self.family == "sd3":  # the default resolution is not in the weights
            cfg = dataclasses.replace(cfg, sample_size=self.tr.config.sample_size)
        assert cfg == self.tr.config
        _equal_trees(tr.params, self.tr.params)
        v = tr(self.lat, self.sigma, self.ctx, self.pooled, guidance=self.guidance)
        assert np.array_equal(np.asarray(v), self.v)

    def check_vae(self, out):
        vae = mj.load_vae(out)
        assert vae.config == self.vae.config
        _equal_trees(vae.params, self.vae.params)
        assert np.array_equal(np.asarray(vae.encode(self.img)), self.z)
        assert np.array_equal(np.asarray(vae.decode(self.z)), self.x)

    def check_text(self, out):
        ctx, pooled = mj.load_text_encoders(out)(PROMPTS, max_sequence_length=9)
        assert np.array_equal(np.asarray(ctx), np.asarray(self.ctx))
        assert np.array_equal(np.asarray(pooled), np.asarray(self.pooled))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3src")
    pipe = sd3_pipeline(str(root), seed=20)
    pipe.save_pretrained(str(root / "pipe"))
    return pipe, root, Reference(str(root / "pipe"), "sd3")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxsrc")
    pipe = flux_pipeline(str(root), seed=30)
    pipe.save_pretrained(str(root / "pipe"))
    return pipe, root, Reference(str(root / "pipe"), "flux")


def _record(out):
    rec = json.loads(open(os.path.join(out, "mmdit_convert.json")).read())
    index = json.loads(open(os.path.join(out, "model_index.json")).read())
    return rec, index


def test_sd3_pipeline_folder(sd3, tmp_path):
    _, root, ref = sd3
    out = str(tmp_path / "out")
    convert(str(root / "pipe"), out)
    ref.check_transformer(out)
    ref.check_vae(out)
    ref.check_text(out)
    rec, index = _record(out)
    assert rec["dtype"] == "float32" and rec["source"] == str(root / "pipe")
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][1] == "T5EncoderModel"


@pytest.mark.parametrize("form", ["safetensors", "pickle"])
def test_sai_single_file_with_vae_and_text_encoders(sd3, tmp_path, form):
    pipe, root, ref = sd3
    tensors = sai_file_tensors(pipe)
    path = str(tmp_path / ("sd3.safetensors" if form == "safetensors" else "sd3.ckpt"))
    save_file(tensors, path) if form == "safetensors" else save_torch_pickle(tensors, path)
    out = str(tmp_path / "out")
    convert(path, out, tokenizers=str(root / "pipe"))
    ref.check_transformer(out, single_file=True)
    ref.check_vae(out)
    ref.check_text(out)
    rec, index = _record(out)
    sched = json.loads(open(os.path.join(out, "scheduler", "scheduler_config.json")).read())
    assert sched == SCHEDULERS["sd3"] and pipe.scheduler.config["shift"] == sched["shift"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert any("scheduler" in n for n in rec["notes"])


def test_sharded_transformer_component_folder(sd3, tmp_path):
    pipe, _, ref = sd3
    pipe.transformer.save_pretrained(str(tmp_path / "comp"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "comp" / "diffusion_pytorch_model.safetensors.index.json")
    out = str(tmp_path / "out")
    convert(str(tmp_path / "comp"), out)
    ref.check_transformer(out)
    _, index = _record(out)
    assert index["vae"] == [None, None]
    assert sorted(os.listdir(out)) == ["mmdit_convert.json", "model_index.json", "transformer"]


def test_flux_pipeline_folder_in_bfloat16(flux, tmp_path):
    _, root, ref = flux
    out = str(tmp_path / "out")
    convert(str(root / "pipe"), out, "bfloat16")
    tr = mj.load_transformer(out, dtype="bfloat16")
    _equal_trees(tr.params, jax.tree.map(lambda x: x.astype("bfloat16"), ref.tr.params))
    # the bf16 copy widens back to exactly the rounded reference
    back = mj.load_transformer(out)
    assert {x.dtype for x in jax.tree.leaves(back.params)} == {np.dtype("float32")}
    convert(str(root / "pipe"), str(tmp_path / "f32"))
    ref.check_transformer(str(tmp_path / "f32"))
    ref.check_vae(str(tmp_path / "f32"))
    ref.check_text(str(tmp_path / "f32"))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_flux_single_files(flux, tmp_path, prefix):
    pipe, _, ref = flux
    save_file(bfl_file_tensors(pipe, prefix), str(tmp_path / "flux1-dev.safetensors"))
    out = str(tmp_path / "out")
    convert(str(tmp_path / "flux1-dev.safetensors"), out)
    ref.check_transformer(out, single_file=True)
    sched = json.loads(open(os.path.join(out, "scheduler", "scheduler_config.json")).read())
    public = {k: v for k, v in pipe.scheduler.config.items() if k in sched and not k.startswith("_")}
    assert sched == SCHEDULERS["flux-dev"] and all(sched[k] == v for k, v in public.items())


def test_bfl_autoencoder_file(flux, tmp_path):
    pipe, _, ref = flux
    save_file(ldm_vae(pipe.vae), str(tmp_path / "ae.safetensors"))
    out = str(tmp_path / "out")
    convert(str(tmp_path / "ae.safetensors"), out)
    assert sorted(os.listdir(out)) == ["config.json", "mmdit_convert.json", "params"]  # a component folder
    ref.check_vae(out)
