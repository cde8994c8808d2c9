"""mmdit-convert on bad input: one line on stderr naming the file and the problem, exit 1, no output
folder (nor a .partial one); code-running pickles are refused unexecuted; a failure half-way through
leaves nothing. Also: export from a training workdir (checkpoint.json pointer)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

import mmdit_jax as mj
from convert_tiny import bfl_file_tensors, flux_pipeline
from mmdit_jax.conversion import to_orbax
from mmdit_jax.io import orbax_io
from mmdit_jax.io.safetensors_io import save_file
from sd3_oracle import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert", "convert.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _fails_cleanly(res, out, pattern):
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("mmdit-convert: ") and pattern in lines[0], lines[0]
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


class _Exploit:
    """Unpickling this would create a file: the converter must refuse it without running it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxerr")
    pipe = flux_pipeline(str(root), seed=40)
    path = str(root / "flux1.safetensors")
    save_file(bfl_file_tensors(pipe), path)
    return path


def test_malicious_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "sd3.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8),
                               "w": _Exploit(str(marker))}}, str(evil))
    res = _cli(f"--src={evil}", f"--out={tmp_path / 'out'}")
    _fails_cleanly(res, tmp_path / "out", "sd3.ckpt: refused or unreadable PyTorch checkpoint")
    assert not marker.exists()


def test_truncated_safetensors(flux_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = open(flux_file, "rb").read()
    cut.write_bytes(data[: len(data) - 1000])
    res = _cli(f"--src={cut}", f"--out={tmp_path / 'out'}", "--dtype=bfloat16")
    _fails_cleanly(res, tmp_path / "out", "cut.safetensors: truncated")


def test_unknown_layout_bad_flags_and_existing_output(tmp_path):
    save_file({"unet.conv_in.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "unet.safetensors"))
    res = _cli(f"--src={tmp_path / 'unet.safetensors'}", f"--out={tmp_path / 'out'}")
    _fails_cleanly(res, tmp_path / "out", "unet.safetensors: no SD3 or FLUX transformer found")
    res = _cli(f"--src={tmp_path / 'unet.safetensors'}", f"--out={tmp_path / 'out'}", "--to=onnx")
    _fails_cleanly(res, tmp_path / "out", "--to")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    res = _cli(f"--src={tmp_path / 'unet.safetensors'}", f"--out={tmp_path / 'taken'}")
    assert res.returncode == 1 and "already exists" in res.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_misshaped_checkpoint_fails_before_writing(flux_file, tmp_path):
    from mmdit_jax.io.safetensors_io import TensorFile

    t = {k: np.asarray(v) for k, v in TensorFile(flux_file).items()}
    t["double_blocks.1.img_attn.proj.weight"] = t["double_blocks.1.img_attn.proj.weight"][:, :-1]
    save_file(t, str(tmp_path / "bad.safetensors"))
    res = _cli(f"--src={tmp_path / 'bad.safetensors'}", f"--out={tmp_path / 'out'}")
    _fails_cleanly(res, tmp_path / "out", "double_blocks.1.img_attn.proj.weight")


def test_failure_half_way_leaves_nothing(flux_file, tmp_path, monkeypatch):
    calls = []

    def add(self, path, array):
        calls.append(path)
        if len(calls) == 20:
            raise OSError(28, "No space left on device", str(tmp_path / "out.partial"))
        real_add(self, path, array)

    real_add = orbax_io.ParamsWriter.add
    monkeypatch.setattr(orbax_io.ParamsWriter, "add", add)
    with pytest.raises(OSError):
        to_orbax.convert(flux_file, str(tmp_path / "out"))
    assert len(calls) == 20 and os.listdir(tmp_path) == []


def test_export_from_training_workdir(tmp_path):
    """A trainer's workdir: transformer/ holds config.json + checkpoint.json pointing at a
    CheckpointManager step; the export writes the EMA item, which diffusers loads."""
    from diffusers import SD3Transformer2DModel

    ref = tiny_model(seed=5, qk_norm="rms_norm", dual_attention_layers=(0,))
    ref.save_pretrained(str(tmp_path / "diff"))
    model = mj.load_transformer(str(tmp_path / "diff"))
    ema = jax.tree.map(lambda x: x * 0.5, model.params)
    mngr = ocp.CheckpointManager(str(tmp_path / "work" / "checkpoints"))
    mngr.save(100, args=ocp.args.Composite(params=ocp.args.StandardSave(model.params),
                                           ema=ocp.args.StandardSave(ema)))
    mngr.wait_until_finished()
    mngr.close()
    comp = tmp_path / "work" / "transformer"
    comp.mkdir()
    (comp / "config.json").write_text(json.dumps(model.config.to_diffusers()))
    (comp / "checkpoint.json").write_text(json.dumps({"directory": "../checkpoints", "item": "ema"}))
    (tmp_path / "work" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    res = _cli("--to=diffusers", f"--src={tmp_path / 'work'}", f"--out={tmp_path / 'out'}")
    assert res.returncode == 0, res.stderr
    back = SD3Transformer2DModel.from_pretrained(str(tmp_path / "out" / "transformer"))
    want = ref.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k] * 0.5), k
