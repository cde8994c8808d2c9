"""The toy world from scratch on CPU, SD3 family: benchmarks/RESULTS.md "Toy demo" has its scores."""
from mmdit_jax.data.config import DataConfig
from mmdit_jax.training.config import (BaseConfig, CheckpointConfig, EMAConfig, EvalConfig, LogConfig, LossConfig,
                                       ModelConfig, OptimConfig, TimestepConfig, TrainConfig)


def get_config(maker: str = "toy") -> TrainConfig:
    return TrainConfig(
        base=BaseConfig(maker=maker, options=dict(clip_length=12)),
        model=ModelConfig(compute_dtype="float32"),
        data=DataConfig(kind="toy", resolution=32, max_sequence_length=12),
        optim=OptimConfig(lr=2e-3, b2=0.99, weight_decay=0.0, schedule="cosine", warmup_steps=100,
                          min_lr_ratio=0.1),
        ema=EMAConfig(decay=0.999),
        timesteps=TimestepConfig(sampler="logit_normal", shift="none"),
        loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.1),
        checkpoint=CheckpointConfig(every=500, keep=2),
        log=LogConfig(every=50, val_every=0),
        eval=EvalConfig(kind="toy", steps=20, guidance=3.0, seeds=(0, 1)),
        batch_size=32, max_steps=1500)
