"""`mmdit-sample --lora=FILE[:SCALE]` (repeatable): two stacked adapters, one a diffusers/PEFT file at
scale 0.7 and one a kohya file, give the image diffusers makes with both loaded (`load_lora_weights` +
`set_adapters`) from the same noise; a missing file is a one-line error."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

import mmdit_jax as mj
from lora_oracle import randomize
from mmdit_jax import lora as L
from sampling_tiny import nchw, sd3_pipeline
from test_sampling_cli import _one_line_error, _run

ARGS = ["--prompt=a red cat", "--height=20", "--width=12", "--steps=3", "--guidance=4.0", "--seed=5",
        "--max_sequence_length=8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample_lora")
    pipe, folder = sd3_pipeline(tmp, seed=70, layers=2)
    model = mj.load_transformer(folder)
    files = {}
    for name, cfg, seed in (("a", L.LoraConfig(targets="attn", rank=2, alpha=3.0), 1),
                            ("b", L.LoraConfig(targets="attn_mlp", rank=3, blocks=(1,)), 2)):
        lora = randomize(L.init_lora(model.config, cfg), seed=seed, std=1.0)
        files[name] = str(tmp / f"{name}.safetensors")
        L.save_lora(lora, files[name], model, "diffusers")
        if name == "b":  # the CLI reads b's kohya twin; diffusers reads the diffusers file
            files["b_kohya"] = str(tmp / "b_kohya.safetensors")
            L.save_lora(lora, files["b_kohya"], model, "kohya")
    return pipe, folder, files


@pytest.mark.slow
def test_stacked_loras_sample_as_diffusers_does(setup, tmp_path):
    pipe, folder, files = setup
    res = _run(f"--model={folder}", *ARGS, f"--lora={files['a']}:0.7", f"--lora={files['b_kohya']}",
               f"--out={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    (name,) = os.listdir(tmp_path)
    got = np.asarray(Image.open(tmp_path / name)).astype(np.float64)
    meta = mj.sampling.images.read_png_metadata(str(tmp_path / name))
    assert meta["command"].count("--lora=") == 2 and ":0.7" in meta["lora"]

    noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(5), 0), (10, 6, 16)))[None]
    kw = dict(height=20, width=12, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=8,
              latents=nchw(noise), output_type="np")
    plain = (pipe("a red cat", **kw).images[0] * 255).round()
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.load_lora_weights(files["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    ref = (pipe("a red cat", **kw).images[0] * 255).round()
    print(f"mmdit-sample --lora x2 vs diffusers: max pixel diff {np.abs(got - ref).max()}, "
          f"LoRAs move pixels by up to {np.abs(ref - plain).max()}")
    assert np.abs(got - ref).max() <= 1  # at most a rounding flip
    assert np.abs(ref - plain).max() > 8  # the adapters matter


def test_missing_lora_file_is_one_line(setup, tmp_path):
    _, folder, _ = setup
    _one_line_error(_run(f"--model={folder}", "--prompt=x", f"--lora={tmp_path / 'nope.safetensors'}:0.5",
                         f"--out={tmp_path}"), "no such file")


def test_guidance_distilled_sd3_samples_with_guidance_and_no_cfg(setup):
    """A student with a (zero-output) guidance embedder samples at any guidance exactly as its teacher
    does without CFG; a trained embedder makes the guidance value matter."""
    import dataclasses

    from mmdit_jax.training.modes import with_guidance_embedder

    _, folder, _ = setup
    base = mj.Pipeline.from_pretrained(folder)
    cfg = dataclasses.replace(base.transformer.config, guidance_embed=True)
    params = with_guidance_embedder(cfg, base.transformer.params, 0)
    student = mj.Pipeline(mj.Transformer(cfg, params), base.vae, base.text_encoders, base.scheduler)
    kw = dict(height=20, width=12, num_inference_steps=2, max_sequence_length=8, output_type="latent", seed=1)
    teacher_no_cfg = np.asarray(base("a red cat", guidance_scale=1.0, **kw))
    np.testing.assert_array_equal(np.asarray(student("a red cat", guidance_scale=4.0, **kw)), teacher_no_cfg)
    r = np.random.default_rng(0)
    params["g_embedder"]["out_layer"]["kernel"] = r.standard_normal(
        params["g_embedder"]["out_layer"]["kernel"].shape).astype(np.float32)
    student = mj.Pipeline(mj.Transformer(cfg, params), base.vae, base.text_encoders, base.scheduler)
    a, b = (np.asarray(student("a red cat", guidance_scale=g, **kw)) for g in (2.0, 4.0))
    assert np.abs(a - b).max() > 1e-3
