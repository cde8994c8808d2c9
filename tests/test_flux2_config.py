"""FLUX.2 configuration: presets sized like diffusers' models of the same config (counted without
allocating), config.json round trips, and detection from a single file's tensor shapes."""
import pytest

import mmdit_jax as mj
from mmdit_jax.flux2 import weights
from mmdit_jax.flux2.config import Flux2Config
from mmdit_jax.io import rules


def _meta_diffusers(config: Flux2Config):
    import torch
    from diffusers import Flux2Transformer2DModel

    kw = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        return Flux2Transformer2DModel(**kw)


@pytest.mark.parametrize("name,width,blocks,guidance", [
    ("flux2-dev", 6144, (8, 48), True),
    ("flux2-klein-4b", 3072, (5, 20), False),
    ("flux2-klein-9b", 4096, (8, 24), False),
])
def test_preset_param_counts_match_diffusers(name, width, blocks, guidance):
    cfg = mj.preset(name)
    assert (cfg.hidden_size, (cfg.depth, cfg.depth_single), cfg.guidance_embed) == (width, blocks, guidance)
    assert cfg.family == "flux2" and cfg.axes_dim == (32, 32, 32, 32) and cfg.theta == 2000
    ref = _meta_diffusers(cfg)
    want = sum(p.numel() for p in ref.parameters())
    assert mj.count_params(cfg) == want
    print(f"{name}: {want:,} parameters")
    assert Flux2Config.from_diffusers(dict(ref.config)) == cfg
    # a single file carries no config: the shapes alone give it back, in either layout
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert Flux2Config.from_weights(shapes, "diffusers", "x") == cfg
    assert Flux2Config.from_weights(bfl_shapes(cfg), "original", "x") == cfg


def bfl_shapes(cfg: Flux2Config) -> dict:
    """Key -> shape of a BFL file of `cfg`, from the key plan over the abstract model (nothing allocated)."""
    from mmdit_jax.structure import Structure
    from mmdit_jax.transformer import abstract_module

    tree = Structure(abstract_module(cfg)).abstract_params()

    def at(path):
        node = tree
        for p in path:
            node = node[p]
        return tuple(node.shape)

    return {k: s for e in weights.plan(cfg) for k, s in rules.export_specs(e, at(e.path), "original")}


def test_released_sizes():
    """FLUX.2-dev is the 32B model; klein 4B and 9B are named for their size, text encoder excluded."""
    assert 31e9 < mj.count_params(mj.preset("flux2-dev")) < 33e9
    assert 3.5e9 < mj.count_params(mj.preset("flux2-klein-4b")) < 4.5e9
    assert 8.5e9 < mj.count_params(mj.preset("flux2-klein-9b")) < 9.5e9


def test_bad_configs_are_clear_errors():
    with pytest.raises(mj.MMDiTError, match="axes_dim"):
        Flux2Config(head_dim=64)  # (32, 32, 32, 32) does not sum to 64
    with pytest.raises(mj.MMDiTError, match="4 axes"):
        Flux2Config(axes_dim=(64, 32, 32))
    with pytest.raises(mj.MMDiTError, match="mlp_ratio"):
        Flux2Config(mlp_ratio=2.5)
    with pytest.raises(mj.MMDiTError, match="patch_size"):
        Flux2Config.from_diffusers({"patch_size": 2})
    assert Flux2Config.from_diffusers({}) == mj.preset("flux2-dev")
