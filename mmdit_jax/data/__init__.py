"""Training data with grain: image-caption folders or a registered source encoded on the fly, or latents
and text embeddings precomputed into ArrayRecord files; aspect-ratio buckets, per-process shards, seeded shuffling,
unreadable images skipped and counted, exactly restorable iterator state."""
from mmdit_jax.data.buckets import make_buckets
from mmdit_jax.data.config import DataConfig
from mmdit_jax.data.encode import Encoders, TextSegment
from mmdit_jax.data.pipeline import TrainData, make_train_data

__all__ = ["DataConfig", "Encoders", "TextSegment", "TrainData", "make_buckets", "make_train_data"]
