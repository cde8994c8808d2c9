"""--config file for the CLI tests: the tiny SD3 network on paced FakeTrainData."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_fake  # noqa: E402


def get_config():
    return train_fake.tiny_config(data_factory="fake_slow", max_steps=12)
