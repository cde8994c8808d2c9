"""Tokenizers of a diffusers pipeline folder, through transformers, from local files only.

The pipelines tokenize with `padding="max_length", truncation=True` and feed the ids without an attention
mask, so what matters for parity is the exact id sequence: the same tokenizer class diffusers would
instantiate (named in model_index.json), its own pad token (CLIP-L pads with EOS, OpenCLIP-G's tokenizer
with "!"), its `model_max_length`.
"""
from __future__ import annotations

import os

import numpy as np

from mmdit_jax.errors import MMDiTError


def load_tokenizer(folder: str, subfolder: str, class_name: str | None = None):
    """The tokenizer in `folder/subfolder`, as the class model_index.json names (AutoTokenizer if none)."""
    path = os.path.join(folder, subfolder)
    if not os.path.isdir(path):
        raise MMDiTError(f"{folder}: pipeline folder has no {subfolder}/ tokenizer")
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    cls = cls or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means unusable tokenizer files
        raise MMDiTError(f"{path}: cannot load the tokenizer ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def tokenize(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """(B, max_length) int32 ids exactly as the diffusers pipelines build them."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids
    return np.asarray(ids, dtype=np.int32)
