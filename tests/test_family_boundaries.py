"""What differs per family lives in its package: code outside a family package asks the `Family` and never
compares family names, and no core module imports the toy world (it registers itself)."""
import ast
import os
import re

import pytest

from mmdit_jax import families as F
from mmdit_jax.data.pipeline import sources
from mmdit_jax.plugins import load_plugins
from mmdit_jax.training import hooks

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmdit_jax")
COMPARISON = re.compile(r"family *(==|!=)")


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(root, name)


def _family_packages():
    """Folders of mmdit_jax holding a family.py (sd3/, flux/, ...)."""
    return {os.path.join(PACKAGE, d) for d in os.listdir(PACKAGE)
            if os.path.isfile(os.path.join(PACKAGE, d, "family.py"))}


def test_family_packages_are_the_registered_families():
    assert {os.path.basename(p) for p in _family_packages()} == set(F.families())


def test_no_family_name_comparison_outside_family_packages():
    inside = _family_packages()
    hits = []
    for path in _modules():
        if os.path.dirname(path) in inside:
            continue
        for i, line in enumerate(open(path).read().splitlines(), 1):
            if COMPARISON.search(line):
                hits.append(f"{os.path.relpath(path, PACKAGE)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_comparison_pattern_catches_what_it_must():
    for line in ('if cfg.family == "sd3":', "if lora.family != cfg.family:", 'x = self.family=="flux"'):
        assert COMPARISON.search(line), line


def _imported(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_core_modules_do_not_import_the_toy_world():
    toy = os.path.join(PACKAGE, "toy")
    hits = [f"{os.path.relpath(path, PACKAGE)}: {name}" for path in _modules()
            if not path.startswith(toy + os.sep)
            for name in _imported(path) if name == "mmdit_jax.toy" or name.startswith("mmdit_jax.toy.")]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("module", ["data/pipeline.py", "sampling/pipeline.py", "training/workdir.py",
                                    "training/hooks.py"])
def test_core_modules_do_not_name_the_toy_world(module):
    text = open(os.path.join(PACKAGE, module)).read()
    assert "toy" not in text.lower()


def test_the_toy_world_registers_itself_through_the_plugin_modules():
    assert "mmdit_jax.toy.train_hooks" in load_plugins()
    assert {"toy", "toy-flux"} <= set(hooks.base_makers())
    assert "toy" in hooks.evaluators() and "toy" in sources()


@pytest.mark.parametrize("name", sorted(F.families()))
def test_each_family_answers_for_itself(name):
    fam = F.families()[name]
    assert F.family_named(name) is fam
    assert F.family_of_pipeline(fam.pipelines.text_to_image, "x") is fam
    for cls in fam.pipelines.names():
        assert F.family_of_pipeline(cls, "x") is fam, cls
    assert F.family_of_diffusers_config({"_class_name": fam.diffusers_class}, "x") is fam
    for preset, cfg in fam.presets.items():
        assert F.family_of_config(cfg) is fam, preset
        assert fam.scheduler_of(cfg) in fam.schedulers, preset
        assert fam.latent_patch(cfg) >= 1
    assert set(fam.text.bundled_folders.values()) <= {f"text_encoder{s}" for s in ("", "_2", "_3")}
    for prefix in fam.vae.single_file_prefixes:  # FLUX.2's VAE files are told apart by their keys
        assert F.family_of_vae_prefix(prefix) is fam
    assert F.ByFamily(lambda f: f.guidance_embedder)[name] == fam.guidance_embedder


def test_unknown_names_are_one_clear_error():
    with pytest.raises(F.MMDiTError, match="unknown model family 'flux9'"):
        F.family_named("flux9")
    with pytest.raises(F.MMDiTError, match="model_index.json: unsupported pipeline class 'KandinskyPipeline'"):
        F.family_of_pipeline("KandinskyPipeline", "model_index.json")
    with pytest.raises(KeyError):
        F.ByFamily(lambda f: f.name)["flux9"]
