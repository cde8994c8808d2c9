"""Training presets, one file per preset: `--config=NAME` reads NAME.py here (dashes and dots in NAME as
underscores) and calls its `get_config()`, which returns a TrainConfig (mmdit_jax.training.config)."""
