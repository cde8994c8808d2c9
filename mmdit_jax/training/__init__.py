"""Flow-matching training for the MMDiT family (`mmdit-train`): config, objective, optimizer, step, loop."""
from mmdit_jax.training.config import (DataConfig, TrainConfig, apply_overrides, load_config, presets,
                                       register_preset, validate)
from mmdit_jax.training.data import register_data_factory

__all__ = ["DataConfig", "TrainConfig", "apply_overrides", "load_config", "presets", "register_data_factory",
           "register_preset", "train", "validate"]


def train(cfg, workdir, **kw):
    from mmdit_jax.training.loop import train as _train

    return _train(cfg, workdir, **kw)
