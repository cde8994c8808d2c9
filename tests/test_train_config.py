"""Config presets, Python config files and --set overrides; validation names the offending key."""
import pytest

from mmdit_jax.errors import MMDiTError
from mmdit_jax.training import config as C


def test_overrides_convert_to_field_types():
    cfg = C.apply_overrides(C.load_config("debug"), [
        "optim.lr=3e-5", "optim.grad_accum=2", "ema.warmup=false", "log.sample_prompts=a cat, on a mat|a dog",
        "model.diffusers_config={\"_class_name\": \"SD3Transformer2DModel\", \"num_layers\": 3}",
        "encoders=/x/y", "data.max_sequence_length=77", "timesteps.sampler=mode", "mesh.fsdp=-1"])
    assert cfg.optim.lr == 3e-5 and cfg.optim.grad_accum == 2 and cfg.ema.warmup is False
    assert cfg.log.sample_prompts == ("a cat, on a mat", "a dog")
    assert cfg.model.diffusers_config["num_layers"] == 3 and cfg.encoders == "/x/y"
    assert cfg.data.max_sequence_length == 77 and cfg.timesteps.sampler == "mode"
    assert C.apply_overrides(cfg, ["encoders=none"]).encoders is None
    C.validate(cfg)


@pytest.mark.parametrize("item, words", [
    ("optim=3", "is a section"), ("optim.lr.x=1", "has no sub-fields"), ("optim.lr", "expected section.field"),
    ("ema.warmup=maybe", "not a valid bool"), ("model.diffusers_config=[1]", "not a valid dict"),
])
def test_bad_overrides(item, words):
    with pytest.raises(MMDiTError, match=words):
        C.apply_overrides(C.TrainConfig(), [item])


@pytest.mark.parametrize("item, key", [
    ("ema.decay=1.0", "ema.decay"), ("timesteps.mode_scale=3", "timesteps.mode_scale"),
    ("loss.weighting=snr", "loss.weighting"), ("optim.schedule=linear", "optim.schedule"),
    ("mesh.tensor=0", "mesh.tensor"), ("loss.encoder_dropout=1.5", "loss.encoder_dropout"),
    ("data_factory=nope", "data_factory"), ("model.compute_dtype=float16", "model.compute_dtype"),
    ("log.sample_every=10", "log.sample_every"), ("timesteps.shift=dynamic", "timesteps.shift"),
])
def test_validation_names_the_key(item, key):
    with pytest.raises(MMDiTError, match=f"--set={key}"):
        C.validate(C.apply_overrides(C.load_config("debug"), [item]))


def test_presets_and_config_files(tmp_path):
    assert {"debug", "sd3-medium-finetune", "flux-dev-finetune"} <= set(C.presets())
    C.register_preset("debug-bigger", lambda: C.load_config("debug").replace(batch_size=16))
    assert C.load_config("debug-bigger").batch_size == 16
    with pytest.raises(MMDiTError, match="model.preset"):  # finetune presets need model.pretrained
        C.validate(C.load_config("sd3-medium-finetune"))
    flux = C.apply_overrides(C.load_config("flux-dev-finetune"), ["model.pretrained=/some/flux"])
    with pytest.raises(MMDiTError, match="data.path"):  # folder data needs its path
        C.validate(flux)
    C.validate(C.apply_overrides(flux, ["data.path=/some/images"]))
    f = tmp_path / "cfg.py"
    f.write_text("from mmdit_jax.training import config as C\n"
                 "def get_config():\n    return C.load_config('debug').replace(max_steps=7)\n")
    assert C.load_config(str(f)).max_steps == 7
    (tmp_path / "bad.py").write_text("def get_config():\n    return 3\n")
    with pytest.raises(MMDiTError, match="not a TrainConfig"):
        C.load_config(str(tmp_path / "bad.py"))
    (tmp_path / "boom.py").write_text("raise RuntimeError('x')\n")
    with pytest.raises(MMDiTError, match="failed to load"):
        C.load_config(str(tmp_path / "boom.py"))
    with pytest.raises(MMDiTError, match="does not exist"):
        C.load_config(str(tmp_path / "missing.py"))


def test_presets_are_files_in_the_configs_package():
    import os

    import setuptools

    import mmdit_jax.configs

    folder = os.path.dirname(mmdit_jax.configs.__file__)
    assert C.preset_file("toy-flux") == os.path.join(folder, "toy_flux.py")
    assert C.preset_file("sd3.5-medium-lora") == os.path.join(folder, "sd3_5_medium_lora.py")
    files = {f for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    assert {os.path.basename(C.preset_file(p)) for p in C.presets() if p != "debug-bigger"} == files
    for name in C.presets():
        assert isinstance(C.load_config(name), C.TrainConfig), name
    assert C.load_config("toy-flux").base.maker == "toy-flux" and C.load_config("toy").base.maker == "toy"
    root = os.path.dirname(os.path.dirname(folder))
    assert "mmdit_jax.configs" in setuptools.find_packages(root, include=["mmdit_jax", "mmdit_jax.*"])


def test_lora_settings_nest_the_adapter_config_and_keep_their_short_keys():
    from mmdit_jax.lora import LoraConfig

    cfg = C.apply_overrides(C.load_config("sd3-medium-lora"), ["lora.rank=8", "lora.blocks=2,0",
                                                               "lora.adapter.alpha=4"])
    assert cfg.lora.adapter == LoraConfig(rank=8, alpha=4.0, blocks=(0, 2), targets="attn")
    with pytest.raises(MMDiTError, match="--set=lora.rank: .*rank 0"):
        C.apply_overrides(cfg, ["lora.rank=0"])


def test_overrides_of_one_section_apply_together():
    # each step alone would break guidance_min <= guidance_max; the result does not
    cfg = C.apply_overrides(C.TrainConfig(), ["distill.guidance_min=8", "distill.guidance_max=9"])
    assert (cfg.distill.guidance_min, cfg.distill.guidance_max) == (8.0, 9.0)
    with pytest.raises(MMDiTError, match="--set=optim.lr"):  # a section checks itself when built
        C.OptimConfig(lr=-1.0)
