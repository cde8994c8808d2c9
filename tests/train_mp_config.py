"""--config file for the multi-process test: the tiny SD3 network on FakeTrainData (a stream per process)."""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_fake  # noqa: E402


def get_config():
    cfg = train_fake.tiny_config(batch_size=4, max_steps=6)
    return cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, every=3, keep=3, async_save=False),
                       log=dataclasses.replace(cfg.log, val_every=0))
