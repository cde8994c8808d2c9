"""On-the-fly encoding of raw batches (uint8 images + captions) with a pipeline folder's VAE and text
encoders, and where each text encoder's part lies in (context, pooled).

Both encoders are jitted (compiled once per batch shape, i.e. per bucket); one call per batch."""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from mmdit_jax.io import paths


@dataclasses.dataclass(frozen=True)
class TextSegment:
    """One text encoder's part of the encoding: context[:, rows, channels] and pooled[:, pooled]. Zeroing
    it gives what the pipeline would produce without that encoder (per-encoder dropout)."""
    name: str
    rows: slice
    channels: slice
    pooled: slice

    def to_json(self) -> list:
        return [self.name] + [[s.start, s.stop] for s in (self.rows, self.channels, self.pooled)]

    @classmethod
    def from_json(cls, value) -> "TextSegment":
        name, rows, channels, pooled = value
        return cls(str(name), slice(*rows), slice(*channels), slice(*pooled))


def text_layout(enc, max_sequence_length: int | None) -> tuple[TextSegment, ...]:
    """The segments of `mj.load_text_encoders`' output, read off its encoders' configs (see
    each family's text encoders, e.g. mmdit_jax/sd3/text.py, for how it assembles context and pooled)."""
    n = max_sequence_length or enc.default_max_sequence_length
    return tuple(TextSegment(*segment) for segment in enc.layout(n))


class Encoders:
    """`encoders(images uint8 (B, H, W, 3), captions) -> {latents, context, pooled}` host float32 arrays."""

    def __init__(self, path: str, dtype: str = "float32", max_sequence_length: int | None = None):
        from mmdit_jax.text import load_text_encoders
        from mmdit_jax.vae import load_vae

        self.vae = load_vae(path, dtype)
        self.text = load_text_encoders(path, dtype, mesh=local_mesh())
        self.max_sequence_length = max_sequence_length
        self.text_layout = text_layout(self.text, max_sequence_length)
        context, pooled = self.encode_text([""])
        context, pooled = context[0], pooled[0]
        context.setflags(write=False)  # shared by every iterator made from these encoders
        pooled.setflags(write=False)
        self.null_text = (context, pooled)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's reduction times the 2x2 latent patches."""
        return self.vae.config.downsample_factor * 2

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        context, pooled = self.text(list(captions), max_sequence_length=self.max_sequence_length)
        return np.asarray(context, np.float32), np.asarray(pooled, np.float32)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 127.5 - 1.0
        return np.asarray(self.vae.encode(x), np.float32)

    def __call__(self, images: np.ndarray, captions: list[str]) -> dict:
        context, pooled = self.encode_text(captions)
        return {"latents": self.encode_images(images), "context": context, "pooled": pooled}


def local_mesh():
    """FSDP over this process's devices (None with one): the text encoders' parameters are split over
    them (T5-XXL alone is 19 GB in float32, over a 16 GB chip). Local, not the training mesh: each
    process encodes its own captions, independently of the others."""
    import jax

    from mmdit_jax.sharding import make_mesh

    devices = jax.local_devices()
    return make_mesh({"fsdp": len(devices)}, devices) if len(devices) > 1 else None


def load_encoders(path: str, dtype: str = "float32", max_sequence_length: int | None = None) -> Encoders:
    """`Encoders` for a pipeline folder, shared within the process (loading and compiling them again for
    every data iterator, e.g. a resumed or an evaluation one, would cost seconds to minutes)."""
    path = os.path.realpath(paths.local(os.fspath(path)))
    index = os.path.join(path, "model_index.json")
    stamp = os.path.getmtime(index) if os.path.isfile(index) else None  # a rewritten folder loads afresh
    return _cached(path, str(dtype), max_sequence_length, stamp)


@functools.lru_cache(maxsize=2)
def _cached(path, dtype, max_sequence_length, stamp) -> Encoders:
    return Encoders(path, dtype, max_sequence_length)
