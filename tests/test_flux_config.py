"""FLUX configuration: presets sized like diffusers' released models, config.json round trips, and
detection from a single file's tensor shapes."""
import numpy as np
import pytest

import mmdit_jax as mj
from flux_oracle import to_bfl
from mmdit_jax.flux.config import FluxConfig


def _meta_diffusers(config: FluxConfig):
    import torch
    from diffusers import FluxTransformer2DModel

    kw = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        return FluxTransformer2DModel(**kw)


@pytest.mark.parametrize("name,guidance", [("flux-dev", True), ("flux-schnell", False)])
def test_preset_param_counts_match_diffusers(name, guidance):
    cfg = mj.preset(name)
    assert cfg.guidance_embed is guidance and cfg.hidden_size == 3072
    ref = _meta_diffusers(cfg)
    want = sum(p.numel() for p in ref.parameters())
    assert mj.count_params(cfg) == want
    print(f"{name}: {want:,} parameters")
    if guidance:
        assert 11.9e9 < want < 12.0e9


def test_presets_differ_only_in_guidance():
    dev, schnell = mj.preset("flux-dev"), mj.preset("flux-schnell")
    assert dev != schnell and FluxConfig(**{**dev.__dict__, "guidance_embed": False}) == schnell
    gap = mj.count_params(dev) - mj.count_params(schnell)
    assert gap == (256 * 3072 + 3072) + (3072 * 3072 + 3072)  # guidance_in's two Linears


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_config_from_shapes_and_config_json(name):
    cfg = mj.preset(name)
    ref = _meta_diffusers(cfg)
    assert FluxConfig.from_diffusers(dict(ref.config)) == cfg
    sd = ref.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert FluxConfig.from_weights(shapes, "diffusers", "x") == cfg
    bfl = {k: tuple(v.shape) for k, v in to_bfl(sd).items()}
    assert FluxConfig.from_weights(bfl, "original", "x") == cfg


def test_bad_configs_are_clear_errors():
    with pytest.raises(mj.MMDiTError, match="axes_dim"):
        FluxConfig(head_dim=64)  # (16, 56, 56) does not sum to 64
    with pytest.raises(mj.MMDiTError, match="patch_size"):
        FluxConfig.from_diffusers({"patch_size": 2})
    assert np.isclose(FluxConfig.from_diffusers({}).mlp_ratio, 4.0)
