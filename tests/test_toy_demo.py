"""The toy demo end to end through the CLI: `mmdit-train --config=toy` writes its base pipeline,
trains, evaluates the workdir through mj.Pipeline, and a rerun of a finished run only re-evaluates.
A few steps only: this checks the plumbing, benchmarks/RESULTS.md "Toy demo" has the real scores."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import mmdit_jax as mj
from mmdit_jax.errors import MMDiTError
from mmdit_jax.toy.dataset import held_out_specs
from mmdit_jax.training import hooks
from mmdit_jax.training.config import apply_overrides, load_config, validate
from test_output_files import UMASK, wrong_modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--set=max_steps=4", "--set=batch_size=4", "--set=log.every=2", "--set=checkpoint.every=2",
         "--set=eval.max_prompts=4", "--set=eval.steps=3", "--set=eval.seeds=5"]


def _train(workdir, config, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "mmdit_jax.cli.train", f"--config={config}",
                          f"--workdir={workdir}", *SHORT, *extra], env=env, capture_output=True, text=True,
                         timeout=600, umask=UMASK)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("toy") / "run")
    # also a periodic sample grid: it must use the pixel VAE's factor 2 and channels 12
    first = _train(work, "toy", "--set=log.sample_every=4", "--set=log.sample_resolution=32",
                   "--set=log.sample_steps=2")
    return work, first


@pytest.mark.slow
def test_toy_run_trains_evaluates_and_writes_the_demo_files(sd3_run):
    work, out = sd3_run
    assert "step 4/4" in out and "ETA" in out
    assert "toy eval (4 images of 4 held-out prompts, 3 steps, CFG 3)" in out
    saved = json.loads(open(os.path.join(work, "eval", "scores.json")).read())
    assert saved["images"] == 4 and saved["seeds"] == [5]
    assert [r["caption"] for r in saved["per_image"]] == [s.caption for s in held_out_specs()[:4]]
    assert set(saved["scores"]) == {"colour", "shape", "position", "size", "object", "overall"}
    for name in ("grid.png", "loss.png"):
        im = Image.open(os.path.join(work, "eval", name))
        assert im.size[0] > 100 and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 2
    # the base pipeline was written once into the workdir and the run trained from it
    assert os.path.isfile(os.path.join(work, "base", "toy.json"))
    cfg = json.loads(open(os.path.join(work, "train_config.json")).read())
    assert cfg["model"]["pretrained"] == cfg["encoders"] == os.path.join(work, "base")
    grid = np.asarray(Image.open(os.path.join(work, "samples", "step_00000004.png")))
    assert grid.shape == (32, 64, 3)  # the two prompts side by side at 32x32 (VAE factor 2, not 8)


@pytest.mark.slow
def test_toy_eval_samples_the_workdir_through_pipeline(sd3_run):
    """The grid's first image is what mj.Pipeline.from_pretrained(WORKDIR) draws for that prompt and
    seed: eval used the trained EMA weights, the base's T5 length and image size, CFG 3."""
    work, _ = sd3_run
    pipe = mj.Pipeline.from_pretrained(work)
    assert pipe.defaults.max_sequence_length == 12 and pipe.defaults.sample_size == 16
    spec = held_out_specs()[0]
    img = pipe([spec.caption], seed=5, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    assert img.shape == (1, 32, 32, 3)
    ours = np.clip(np.rint(img[0].astype(np.float64) * 255), 0, 255).astype(np.uint8)
    grid = np.asarray(Image.open(os.path.join(work, "eval", "grid.png")).convert("RGB"))
    shown = grid[2:2 + 128:4, 4:4 + 128:4]  # draw_grid: at (4, 2), enlarged 4x nearest
    assert np.abs(shown.astype(int) - ours.astype(int)).max() <= 1
    trained = jax.tree.leaves(mj.load_transformer(work).params)
    base = jax.tree.leaves(mj.load_transformer(os.path.join(work, "base")).params)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(trained, base)) > 1e-6


@pytest.mark.slow
def test_workdir_files_get_the_umask_mode(sd3_run):
    """Everything the run wrote (its base pipeline, checkpoints, metrics, TensorBoard events, sample and
    eval PNGs, scores, the pipeline's JSON files) has the mode the run's umask gives a new file."""
    work, _ = sd3_run
    for p in ("base/transformer/config.json", "checkpoints", "metrics.jsonl", "train_config.json",
              "transformer/checkpoint.json", "samples/step_00000004.png", "eval/grid.png", "eval/scores.json",
              "eval/loss.png", "tensorboard"):
        assert os.path.exists(os.path.join(work, p)), p
    assert wrong_modes(work) == {}


@pytest.mark.slow
def test_moved_workdir_samples_the_same_pixels(sd3_run, tmp_path):
    """The workdir's links into its own base/ are relative: a copy samples as the original did with
    the original gone."""
    work, _ = sd3_run
    links = [os.readlink(os.path.join(work, n)) for n in os.listdir(work) if os.path.islink(os.path.join(work, n))]
    assert len(links) >= 8 and not any(os.path.isabs(t) for t in links)
    prompt = held_out_specs()[0].caption
    kw = dict(seed=5, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    before = mj.Pipeline.from_pretrained(work)([prompt], **kw)
    moved = str(tmp_path / "moved")
    shutil.copytree(work, moved, symlinks=True)
    os.rename(work, work + ".away")  # nothing may lead back to the original
    try:
        after = mj.Pipeline.from_pretrained(moved)([prompt], **kw)
    finally:
        os.rename(work + ".away", work)
    np.testing.assert_array_equal(after, before)


@pytest.mark.slow
def test_rerun_of_a_finished_run_only_reevaluates(sd3_run):
    work, _ = sd3_run
    ckpts = sorted(os.listdir(os.path.join(work, "checkpoints")))
    metrics = open(os.path.join(work, "metrics.jsonl")).read()
    before = json.loads(open(os.path.join(work, "eval", "scores.json")).read())
    os.remove(os.path.join(work, "eval", "grid.png"))
    out = _train(work, "toy")
    assert "evaluating only" in out and not re.search(r"^step \d+/", out, re.M)
    assert "writing the base pipeline" not in out
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ckpts
    assert open(os.path.join(work, "metrics.jsonl")).read() == metrics
    assert os.path.isfile(os.path.join(work, "eval", "grid.png"))
    assert json.loads(open(os.path.join(work, "eval", "scores.json")).read()) == before


@pytest.mark.slow
def test_toy_flux_run(tmp_path):
    work = str(tmp_path / "flux")
    out = _train(work, "toy-flux", "--set=max_steps=2", "--set=batch_size=2", "--set=eval.max_prompts=2")
    assert "toy eval (2 images of 2 held-out prompts" in out
    assert json.loads(open(os.path.join(work, "eval", "scores.json")).read())["images"] == 2
    pipe = mj.Pipeline.from_pretrained(work)
    assert pipe.family == "flux" and pipe.defaults.sample_size == 16 and pipe.defaults.max_sequence_length == 12


def test_toy_config_validation_names_the_field():
    cfg = load_config("toy")
    assert validate(cfg) is cfg and cfg.base.maker == "toy" and cfg.eval.kind == "toy"
    assert {"toy", "toy-flux"} <= set(hooks.base_makers()) and "toy" in hooks.evaluators()
    bad = [("base.maker=nope", "--set=base.maker"), ("model.preset=sd3-medium", "--set=model.preset"),
           ("eval.kind=nope", "--set=eval.kind"), ("eval.steps=0", "--set=eval.steps"),
           ("eval.max_prompts=-1", "--set=eval.max_prompts"), ("encoders=/x", "--set=encoders")]
    for item, key in bad:
        with pytest.raises(MMDiTError, match="^" + key.replace(".", r"\.")):
            validate(apply_overrides(cfg, [item]))


def test_unknown_toy_base_option_is_refused(tmp_path):
    cfg = apply_overrides(load_config("toy"), ['base.options={"layerz": 2}'])
    with pytest.raises(MMDiTError, match=r"--set=base\.options: unknown toy settings \['layerz'\]"):
        hooks.prepare_base(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "base")


def test_model_index_sampling_defaults_set_pipeline_defaults_and_bad_ones_are_named(tmp_path):
    from mmdit_jax.sampling.pipeline import SAMPLING_DEFAULTS_KEY, Defaults, _folder_defaults

    base = Defaults(28, 7.0, 256, 128)
    index = tmp_path / "model_index.json"
    assert _folder_defaults(str(tmp_path), base) is base  # no model_index.json: the family's defaults
    index.write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert _folder_defaults(str(tmp_path), base) is base  # none set: the family's defaults
    index.write_text(json.dumps({SAMPLING_DEFAULTS_KEY: {"max_sequence_length": 12, "sample_size": 16}}))
    assert _folder_defaults(str(tmp_path), base) == Defaults(28, 7.0, 12, 16)
    index.write_text(json.dumps({SAMPLING_DEFAULTS_KEY: {"guidance_scale": 3, "num_inference_steps": 4}}))
    assert _folder_defaults(str(tmp_path), base) == Defaults(4, 3, 256, 128)
    for bad in ("{", [12], {"max_sequence_length": 0}, {"sample_size": 16.5}, {"resolution": 32},
                {"guidance_scale": True}):
        index.write_text(bad if isinstance(bad, str) else json.dumps({SAMPLING_DEFAULTS_KEY: bad}))
        with pytest.raises(MMDiTError, match="model_index.json"):
            _folder_defaults(str(tmp_path), base)
