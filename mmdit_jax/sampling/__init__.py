"""Sampling: schedules, solvers, guidance, the jitted denoising loop and `Pipeline`."""
from mmdit_jax.sampling.pipeline import Pipeline
from mmdit_jax.sampling.schedules import SchedulerConfig, read_scheduler_config

__all__ = ["Pipeline", "SchedulerConfig", "read_scheduler_config"]
