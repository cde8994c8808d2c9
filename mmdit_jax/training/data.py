"""Where the trainer gets its batches: `mmdit_jax.data.make_train_data` (the data pipeline), or a factory
registered under a name (config field `data_factory`) by a --config Python file: synthetic data for
benchmarks, precomputed embeddings held elsewhere, test doubles.

Whatever makes it, the object follows the data contract: `next(data)` -> dict(latents (B, h, w, C),
context (B, L, D), pooled (B, P)) numpy; `null_text`; `text_layout`; `get_state()` / `set_state()`;
`stats()`.
"""
from __future__ import annotations

from typing import Callable


_FACTORIES: dict[str, Callable] = {}


def register_data_factory(name: str, fn: Callable) -> None:
    """fn(data_config, *, batch_size, seed, encoders_path, dtype, process_index, process_count)."""
    _FACTORIES[name] = fn


def factories() -> dict[str, Callable]:
    return dict(_FACTORIES)


def make_data(cfg, *, seed: int, encoders_path, process_index: int, process_count: int):
    kw = dict(batch_size=cfg.batch_size, seed=seed, encoders_path=encoders_path, dtype=cfg.model.compute_dtype,
              process_index=process_index, process_count=process_count)
    if cfg.data_factory is not None:
        return _FACTORIES[cfg.data_factory](cfg.data, **kw)
    from mmdit_jax.data import make_train_data
    return make_train_data(cfg.data, **kw)
