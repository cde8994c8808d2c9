"""Full finetuning of an SD3 pipeline: --set=model.pretrained=PIPELINE_FOLDER --set=data.path=IMAGES."""
from mmdit_jax.data.config import DataConfig
from mmdit_jax.training.config import ModelConfig, OptimConfig, TimestepConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(remat="dots"),
        optim=OptimConfig(lr=1e-5, warmup_steps=500),
        timesteps=TimestepConfig(sampler="logit_normal", shift="fixed", shift_value=3.0),
        data=DataConfig(kind="folder", resolution=1024), batch_size=4)
