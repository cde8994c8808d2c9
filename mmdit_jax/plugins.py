"""Extensions that live in their own subpackage (a demo world, a data source) and register makers,
evaluators and data sources with the trainer's registries (training/hooks.py, data/pipeline.py).

A subpackage extends the trainer by holding a `train_hooks.py` that registers on import; every such
module in the package is imported on the first registry lookup, so the core names no extension and a
config that names a registered maker or data kind needs no extra import.
"""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil

PLUGIN_MODULE = "train_hooks"


@functools.cache
def load_plugins() -> tuple[str, ...]:
    """Imports every `mmdit_jax.<subpackage>.train_hooks`; returns their names."""
    import mmdit_jax

    names = []
    for info in pkgutil.iter_modules(mmdit_jax.__path__):
        # by file, not find_spec: looking must not import every subpackage
        folder = os.path.join(info.module_finder.path, info.name)
        if info.ispkg and os.path.isfile(os.path.join(folder, f"{PLUGIN_MODULE}.py")):
            names.append(f"mmdit_jax.{info.name}.{PLUGIN_MODULE}")
    for name in names:
        importlib.import_module(name)
    return tuple(names)
