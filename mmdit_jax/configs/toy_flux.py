"""The toy world from scratch on CPU, FLUX family: the `toy` preset with the FLUX base maker."""
from mmdit_jax.configs import toy
from mmdit_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    return toy.get_config(maker="toy-flux")
