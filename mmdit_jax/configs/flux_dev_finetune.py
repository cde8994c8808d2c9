"""Full finetuning of FLUX.1-dev: --set=model.pretrained=PIPELINE_FOLDER --set=data.path=IMAGES."""
from mmdit_jax.data.config import DataConfig
from mmdit_jax.training.config import LossConfig, ModelConfig, OptimConfig, TimestepConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(remat="dots"),
        optim=OptimConfig(lr=1e-5, warmup_steps=500),
        timesteps=TimestepConfig(sampler="logit_normal", shift="flux"),
        loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.1, guidance=1.0),
        data=DataConfig(kind="folder", resolution=1024), batch_size=1)
