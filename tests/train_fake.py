"""A stand-in for the data pipeline's TrainData (the contract in mmdit_jax/training/data.py): synthetic,
already-encoded batches, deterministic in (seed, process, position), with a resumable position."""
import collections

import numpy as np

from mmdit_jax.training import TrainConfig, register_data_factory
from mmdit_jax.training.config import (CheckpointConfig, EMAConfig, LogConfig, LossConfig, ModelConfig,
                                       OptimConfig, TimestepConfig)

TextSegment = collections.namedtuple("TextSegment", "name rows channels pooled")
TINY_SD3 = dict(_class_name="SD3Transformer2DModel", num_layers=1, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
                pos_embed_max_size=8, sample_size=8, qk_norm="rms_norm")
LATENT_HW = (6, 4)
TEXT_LEN = 5


class FakeTrainData:
    def __init__(self, batch_size, seed, process_index=0, fixed=False, channels=16, context_dim=12,
                 pooled_dim=10):
        self.b, self.seed, self.proc, self.fixed = batch_size, seed, process_index, fixed
        self.shape = (channels, context_dim, pooled_dim)
        self.index = 0
        self.text_layout = (TextSegment("clip", slice(0, 2), slice(0, 8), slice(0, 6)),
                            TextSegment("t5", slice(2, TEXT_LEN), slice(0, context_dim), slice(0, 0)))
        r = np.random.default_rng(12345)
        # clearly non-zero (as real empty-caption encodings are), so a zero stand-in would show
        self.null_text = (r.standard_normal((TEXT_LEN, context_dim)).astype(np.float32),
                          r.standard_normal(pooled_dim).astype(np.float32))

    def __iter__(self):
        return self

    def __next__(self):
        r = np.random.default_rng([self.seed, self.proc, 0 if self.fixed else self.index])
        self.index += 1
        c, d, p = self.shape
        # latents with structure (a smooth ramp per sample) so a small network can fit them
        base = np.linspace(-1, 1, LATENT_HW[0] * LATENT_HW[1] * c).reshape(LATENT_HW + (c,))
        lat = base[None] * r.uniform(0.5, 1.5, (self.b, 1, 1, 1)) + 0.1 * r.standard_normal((self.b,) + base.shape)
        return dict(latents=lat.astype(np.float32),
                    context=r.standard_normal((self.b, TEXT_LEN, d)).astype(np.float32),
                    pooled=r.standard_normal((self.b, p)).astype(np.float32))

    def get_state(self):
        return {"index": self.index, "process": self.proc}

    def set_state(self, state):
        # a process handed another process's stream position would silently read the wrong shard
        assert state.get("process", self.proc) == self.proc, (state, self.proc)
        self.index = int(state["index"])

    def stats(self):
        return {"batches": self.index}


def factory(data_cfg, *, batch_size, seed, encoders_path, dtype, process_index, process_count):
    return FakeTrainData(batch_size, seed, process_index)


def fixed_factory(data_cfg, *, batch_size, seed, encoders_path, dtype, process_index, process_count):
    return FakeTrainData(batch_size, seed, process_index, fixed=True)


register_data_factory("fake", factory)
register_data_factory("fake_fixed", fixed_factory)


def tiny_config(**kw) -> TrainConfig:
    base = TrainConfig(
        model=ModelConfig(diffusers_config=dict(TINY_SD3), compute_dtype="float32"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine", clip_norm=1.0),
        ema=EMAConfig(decay=0.9), timesteps=TimestepConfig(sampler="logit_normal", shift="fixed", shift_value=2.0),
        loss=LossConfig(encoder_dropout=0.3, caption_dropout=0.2),
        checkpoint=CheckpointConfig(every=3, keep=2, async_save=True),
        log=LogConfig(every=1, val_every=4), batch_size=4, max_steps=10, seed=1, data_factory="fake")
    return base.replace(**kw)


class SlowFakeTrainData(FakeTrainData):
    """Paced batches so a test can SIGTERM a run mid-way."""

    def __next__(self):
        import time

        time.sleep(0.25)
        return super().__next__()


register_data_factory("fake_slow", lambda data_cfg, *, batch_size, seed, process_index, **kw:
                      SlowFakeTrainData(batch_size, seed, process_index))
