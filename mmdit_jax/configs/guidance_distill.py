"""Guidance distillation: --set=model.pretrained=TEACHER (e.g. an mmdit-convert folder); the student
starts as the teacher."""
from mmdit_jax.data.config import DataConfig
from mmdit_jax.training.config import (DistillConfig, LossConfig, ModelConfig, OptimConfig, TimestepConfig,
                                       TrainConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(remat="dots"), optim=OptimConfig(lr=1e-5, warmup_steps=200),
        timesteps=TimestepConfig(sampler="logit_normal", shift="fixed", shift_value=3.0),
        loss=LossConfig(encoder_dropout=0.0),
        distill=DistillConfig(enabled=True, guidance_min=1.0, guidance_max=7.0),
        data=DataConfig(kind="folder", resolution=1024), batch_size=4, max_steps=5000)
