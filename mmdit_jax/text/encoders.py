"""`load_text_encoders`: a family's tokenizers + encoders, building what diffusers' `encode_prompt` builds.

Each family's set lives in its package (`Family.text.encoders`: sd3/text.py, flux/text.py) and is
called as `enc(prompts, max_sequence_length=None) -> (context, pooled)`. Each call tokenizes on the
host and runs one jitted function, compiled once per (batch, length).
"""
from __future__ import annotations

import os

import numpy as np

from mmdit_jax.io import paths
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.sources import read_json
from mmdit_jax.dtypes import parse_dtype
from mmdit_jax.text.tokenizers import load_tokenizer


def pipeline_component(index: dict, name: str) -> str | None:
    """The class model_index.json names for a component, or None when it is absent (null)."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return entry[1]


def prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise MMDiTError("prompts must be a string or a non-empty list of strings")
    return prompts


def check_length(n, name="max_sequence_length"):
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise MMDiTError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def load_text_encoders(path, dtype="float32", mesh=None):
    """The text encoders of a diffusers pipeline folder of any family; with `mesh`, their parameters are
    sharded over it by the logical-axis rules, as the transformer's are.

    Returns `enc` with `enc(prompts, max_sequence_length=None) -> (context, pooled)` jax arrays and
    `enc.family` the family's name."""
    from mmdit_jax.families import family_of_pipeline

    dtype = parse_dtype(dtype)
    path = paths.local(os.fspath(path))
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise MMDiTError(f"{path}: text encoders load from a diffusers pipeline folder (model_index.json "
                         "with its tokenizer*/ and text_encoder*/ folders)")
    index = read_json(index_path)
    cls = str(index.get("_class_name", ""))

    def tok(name):
        return load_tokenizer(path, name, pipeline_component(index, name))

    # a pipeline class names its family (StableDiffusion3Img2ImgPipeline, FluxPipeline, Flux2KleinPipeline)
    fam = family_of_pipeline(cls, index_path)
    return fam.text.encoders.from_pipeline(path, index, dtype, mesh, tok)
