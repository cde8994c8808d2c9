"""What the package writes for a user: files and folders appear whole, with the mode the user's umask
gives any new file (never a temporary's private 0600 / 0700), and links inside a folder are relative
so it can be moved. The trained workdir is checked in tests/test_toy_demo.py, mmdit-sample's PNGs in
tests/test_sampling_cli.py."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmdit_jax.io.files import atomic_file, atomic_folder, copy_tree, link, write_json
from mmdit_jax.io.safetensors_io import TensorFile, save_file
from mmdit_jax.sampling.images import read_png_metadata, save_png

UMASK = 0o027
FILE, DIR = 0o666 & ~UMASK, 0o777 & ~UMASK  # 0640, 0750


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def modes(root) -> dict:
    """{path relative to root: permission bits} of root and everything under it, links excluded."""
    out = {".": os.stat(root).st_mode & 0o777}
    for d, dirs, names in os.walk(root):
        for n in dirs + names:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                out[os.path.relpath(p, root)] = os.lstat(p).st_mode & 0o777
    return out


def wrong_modes(root) -> dict:
    """Entries whose mode is not what the umask gives a new file or folder."""
    return {p: oct(m) for p, m in modes(root).items()
            if m != (DIR if os.path.isdir(os.path.join(root, p)) else FILE)}


def test_png_json_safetensors_and_folders_get_the_umask_mode(umask, tmp_path):
    png = save_png(Image.fromarray(np.full((4, 6, 3), 200, np.uint8)), str(tmp_path / "out" / "a.png"),
                   {"seed": 3})
    assert read_png_metadata(png)["seed"] == "3"
    write_json(tmp_path / "out" / "c.json", {"a": 1})
    save_file({"w": np.ones((2, 3), np.float32)}, str(tmp_path / "out" / "w.safetensors"))
    np.testing.assert_array_equal(TensorFile(str(tmp_path / "out" / "w.safetensors"))["w"], np.ones((2, 3)))
    with atomic_folder(tmp_path / "out" / "folder") as tmp:
        write_json(os.path.join(tmp, "x.json"), [1])
        os.makedirs(os.path.join(tmp, "sub"))
    assert json.loads((tmp_path / "out" / "folder" / "x.json").read_text()) == [1]
    assert wrong_modes(tmp_path / "out") == {}
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "c.json", "folder", "w.safetensors"]


def test_copies_take_the_umask_mode_not_the_sources(umask, tmp_path):
    src = tmp_path / "private"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("x")
    os.chmod(src / "sub" / "f.txt", 0o600)
    os.chmod(src / "sub", 0o700)
    os.chmod(src, 0o700)
    copy_tree(src, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "f.txt").read_text() == "x"
    assert wrong_modes(tmp_path / "copy") == {}


def test_a_failed_write_leaves_nothing_and_a_folder_is_replaced_whole(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.txt", "w") as f:
            f.write("half")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "d") as tmp:
            write_json(os.path.join(tmp, "x.json"), 1)
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    for value in ("old", "new"):
        with atomic_folder(tmp_path / "d") as tmp:
            write_json(os.path.join(tmp, f"{value}.json"), value)
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == ["new.json"]


def test_links_are_relative_inside_their_folder_and_absolute_outside(tmp_path):
    root, outside = tmp_path / "work", tmp_path / "elsewhere"
    (root / "base" / "vae").mkdir(parents=True)
    outside.mkdir()
    link(root / "base" / "vae", root / "vae", root)
    link(outside, root / "ext", root)
    assert os.readlink(root / "vae") == os.path.join("base", "vae")
    assert os.readlink(root / "ext") == str(outside)
    # an old absolute link to inside is re-pointed; a real folder in the way is left alone
    os.remove(root / "vae")
    os.symlink(root / "base" / "vae", root / "vae")
    (root / "mine").mkdir()
    link(root / "base" / "vae", root / "vae", root)
    link(root / "base" / "vae", root / "mine", root)
    assert os.readlink(root / "vae") == os.path.join("base", "vae") and not os.path.islink(root / "mine")
    os.rename(root, tmp_path / "moved")
    assert os.path.isdir(tmp_path / "moved" / "vae") and os.path.isdir(tmp_path / "moved" / "ext")


def test_converted_and_exported_pipeline_folders_get_the_umask_mode(umask, tmp_path):
    """mmdit-convert's folder (Orbax components, copied scheduler) and the diffusers export back, from a
    source whose scheduler folder is private: the copies are the user's new files, not the source's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmdit_jax.conversion.export import export
    from mmdit_jax.conversion.to_orbax import convert
    from sd3_oracle import tiny_model

    src = tmp_path / "src"
    tiny_model(seed=1).save_pretrained(str(src / "transformer"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(src / "scheduler"))
    write_json(src / "model_index.json", {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
                                          "transformer": ["diffusers", "SD3Transformer2DModel"],
                                          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    os.chmod(src / "scheduler" / "scheduler_config.json", 0o600)
    os.chmod(src / "scheduler", 0o700)
    convert(str(src), str(tmp_path / "orbax"))
    export(str(tmp_path / "orbax"), str(tmp_path / "diffusers"))
    assert json.loads((tmp_path / "orbax" / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    assert os.path.isfile(tmp_path / "diffusers" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert wrong_modes(tmp_path / "orbax") == {} and wrong_modes(tmp_path / "diffusers") == {}
