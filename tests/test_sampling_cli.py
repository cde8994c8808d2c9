"""`mmdit-sample` (sample/sample.py in a subprocess): PNGs with reproducible metadata, same seed -> same
pixels, and the same image diffusers makes from the same noise; one-line errors for bad input."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mmdit_jax.sampling.images import read_png_metadata
from sampling_tiny import nchw, sd3_pipeline
from test_output_files import UMASK, wrong_modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample", "sample.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, umask=UMASK)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("cli"), seed=60)


@pytest.mark.slow
def test_writes_reproducible_pngs_matching_diffusers(model, tmp_path):
    pipe, folder = model
    args = [f"--model={folder}", "--prompt=a red cat", "--negative_prompt=blue sky", "--height=20", "--width=12",
            "--steps=3", "--guidance=4.0", "--seed=7", "--num_images=2", "--max_sequence_length=8"]
    res = _run(*args, f"--out={tmp_path / 'a'}")
    assert res.returncode == 0, res.stderr[-3000:]
    # progress into a pipe: plain lines, the first before any rate is measured, and the last
    progress = [ln for ln in res.stderr.splitlines() if ln.startswith("sampling: ")]
    assert "\r" not in res.stderr and "nan" not in res.stderr
    assert progress[0] == "sampling: step 1/3" and progress[-1].startswith("sampling: step 3/3, ")
    files = sorted(os.listdir(tmp_path / "a"))
    assert len(files) == 2 and all(f.endswith(".png") for f in files)
    assert wrong_modes(tmp_path / "a") == {}  # readable as the user's other new files
    meta = read_png_metadata(str(tmp_path / "a" / files[1]))
    assert meta["prompt"] == "a red cat" and meta["negative_prompt"] == "blue sky"
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["index"]) == ("7", "3", "4.0", "1")
    assert meta["model"] == os.path.abspath(folder) and meta["sampler"] == "euler"
    assert meta["dtype"] == "float32"  # no --dtype: the CPU's default, recorded as used
    assert meta["command"].startswith("mmdit-sample ") and "--seed=7" in meta["command"]

    res = _run(*args, f"--out={tmp_path / 'b'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "b")) == files
    pix = [np.asarray(Image.open(tmp_path / "a" / f)) for f in files]
    for f, p in zip(files, pix):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b" / f)), p)
    assert np.abs(pix[0].astype(int) - pix[1]).max() > 0  # the two images differ

    # diffusers from the noise the seed stands for: image i starts from normal(fold_in(key(seed), i))
    key = jax.random.key(7)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (10, 6, 16))) for i in range(2)])
    ref = pipe("a red cat", negative_prompt="blue sky", height=20, width=12, num_inference_steps=3,
               guidance_scale=4.0, max_sequence_length=8, num_images_per_prompt=2, latents=nchw(noise),
               output_type="np").images
    ref = (ref * 255).round()
    for p, r in zip(pix, ref):
        assert np.abs(p.astype(np.float64) - r).max() <= 1  # at most a rounding flip


def _one_line_error(res, text):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmdit-sample: error:") and text in lines[0], res.stderr


def test_bad_size_is_one_line(model, tmp_path):
    _, folder = model
    _one_line_error(_run(f"--model={folder}", "--prompt=x", "--height=22", f"--out={tmp_path}"), "multiples of 4")
    assert not os.listdir(tmp_path)


def test_missing_model_and_component_are_one_line(model, tmp_path):
    _, folder = model
    _one_line_error(_run(f"--model={tmp_path / 'nope'}", "--prompt=x"), "no such model folder")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    _one_line_error(_run(f"--model={broken}", "--prompt=x"), "vae")
    _one_line_error(_run("--prompt=x"), "--model is required")
    _one_line_error(_run(f"--model={folder}", "--prompt=x", "--steps=many"), "--steps")


def _png(folder):
    (name,) = os.listdir(folder)
    return np.asarray(Image.open(os.path.join(folder, name)))


def _pil(images):
    return np.asarray(images[0])


@pytest.mark.slow
def test_guidance_sampler_and_schedule_flags_give_the_pipelines_pixels(model, tmp_path):
    """--slg_*, --sampler and --schedule: the same pixels as the Pipeline call with the same arguments,
    and each flag's value changes them (so a flag the CLI dropped would show)."""
    import mmdit_jax as mj

    _, folder = model
    res = _run(f"--model={folder}", "--prompt=a red cat", "--height=20", "--width=12", "--steps=5",
               "--guidance=4.0", "--seed=7", "--max_sequence_length=8", "--slg_layers=1", "--slg_scale=3.0",
               "--slg_start=0.3", "--slg_stop=0.7", "--sampler=dpmpp_2m", "--schedule=bfl", "--noprogress",
               f"--out={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    got = _png(tmp_path)
    pipe = mj.Pipeline.from_pretrained(folder)
    kw = dict(height=20, width=12, num_inference_steps=5, guidance_scale=4.0, seed=7, max_sequence_length=8,
              skip_guidance_layers=[1], skip_layer_guidance_scale=3.0, skip_layer_guidance_start=0.3,
              skip_layer_guidance_stop=0.7, sampler="dpmpp_2m", schedule="bfl", progress=False)
    np.testing.assert_array_equal(got, _pil(pipe("a red cat", **kw)))
    # slg active at steps 2, 3 of 5; start 0.01 would give steps 1-3, stop 0.5 step 2 only
    for change in (dict(skip_guidance_layers=None), dict(skip_layer_guidance_scale=2.8),
                   dict(skip_layer_guidance_start=0.01), dict(skip_layer_guidance_stop=0.5),
                   dict(sampler="euler"), dict(schedule="diffusers")):
        other = _pil(pipe("a red cat", **{**kw, **change}))
        assert np.abs(other.astype(int) - got).max() > 0, change


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    from sampling_tiny import flux_pipeline

    return flux_pipeline(tmp_path_factory.mktemp("cli_flux"), seed=61)


@pytest.mark.slow
def test_flux_img2img_true_cfg_dpmpp_flags_give_the_pipelines_pixels(flux_model, tmp_path):
    """--img2img/--strength, --true_cfg with --negative_prompt and --sampler=dpmpp_2m on FLUX-dev: the
    pixels of Pipeline.img2img with the same arguments, and each flag's value changes them."""
    import mmdit_jax as mj

    _, folder = flux_model
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(5).uniform(0, 1, (20, 12, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / "out"
    res = _run(f"--model={folder}", "--prompt=a red cat", "--negative_prompt=a dog", "--true_cfg=2.5",
               f"--img2img={src}", "--strength=0.7", "--sampler=dpmpp_2m", "--guidance=3.0", "--steps=5",
               "--seed=3", "--max_sequence_length=8", "--noprogress", f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    got = _png(out)
    assert got.shape == (20, 12, 3)
    pipe = mj.Pipeline.from_pretrained(folder)
    image = Image.open(src)
    kw = dict(negative_prompt="a dog", true_cfg_scale=2.5, strength=0.7, sampler="dpmpp_2m", guidance_scale=3.0,
              num_inference_steps=5, seed=3, max_sequence_length=8, progress=False)
    np.testing.assert_array_equal(got, _pil(pipe.img2img(image, "a red cat", **kw)))
    for change in (dict(true_cfg_scale=1.0), dict(strength=0.6), dict(sampler="euler")):
        other = _pil(pipe.img2img(image, "a red cat", **{**kw, **change}))
        assert np.abs(other.astype(int) - got).max() > 0, change
    txt2img = {k: v for k, v in kw.items() if k != "strength"}
    other = _pil(pipe("a red cat", height=20, width=12, **txt2img))
    assert np.abs(other.astype(int) - got).max() > 0
