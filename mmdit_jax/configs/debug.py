"""A few-layer SD3 network that trains on CPU in seconds."""
from mmdit_jax.training.config import CheckpointConfig, EMAConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(diffusers_config=dict(
            _class_name="SD3Transformer2DModel", num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
            pos_embed_max_size=16, sample_size=8), compute_dtype="float32"),
        optim=OptimConfig(lr=1e-3), ema=EMAConfig(decay=0.99),
        checkpoint=CheckpointConfig(every=10, keep=2), log=LogConfig(every=1, val_every=5),
        batch_size=4, max_steps=20)
