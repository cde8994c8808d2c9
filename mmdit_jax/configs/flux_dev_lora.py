"""LoRA on FLUX.1-dev: --set=model.pretrained=PIPELINE_FOLDER; the result is
WORKDIR/lora/pytorch_lora_weights.safetensors."""
from mmdit_jax.data.config import DataConfig
from mmdit_jax.lora.adapter import LoraConfig
from mmdit_jax.training.config import (EMAConfig, LoraTrainConfig, LossConfig, ModelConfig, OptimConfig,
                                       TimestepConfig, TrainConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(remat="dots"), optim=OptimConfig(lr=1e-4, warmup_steps=100, weight_decay=1e-4),
        ema=EMAConfig(decay=0.0), timesteps=TimestepConfig(sampler="logit_normal", shift="flux"),
        loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.0, guidance=1.0),
        lora=LoraTrainConfig(enabled=True, adapter=LoraConfig(rank=16, targets="attn"), base_dtype="bfloat16"),
        data=DataConfig(kind="folder", resolution=1024), batch_size=1, max_steps=2000)
