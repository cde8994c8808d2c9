"""FLUX.1's text encoders: CLIP-L (pooled) + T5 (context) as FluxPipeline's `encode_prompt` combines them.

Context = T5 last hidden state (max_sequence_length default 512); pooled = CLIP-L pooler_output (no
projection).
"""
from __future__ import annotations

import jax

from mmdit_jax.text.encoders import check_length, prompt_list
from mmdit_jax.text.tokenizers import tokenize
from mmdit_jax.text.weights import load_clip, load_t5


class FluxTextEncoders:
    """CLIP-L (pooled) + T5 (context) as FluxPipeline combines them."""

    family = "flux"
    default_max_sequence_length = 512

    @classmethod
    def context_length(cls, max_sequence_length: int | None = None) -> int:
        """Context rows per prompt: T5's only (CLIP gives the pooled vector)."""
        return max_sequence_length or cls.default_max_sequence_length

    @classmethod
    def from_pipeline(cls, path: str, index: dict, dtype, mesh, tok) -> "FluxTextEncoders":
        """From a FluxPipeline folder; `tok(name)` loads a tokenizer folder."""
        clip = load_clip(path, dtype, subfolder="text_encoder", mesh=mesh)
        t5 = load_t5(path, dtype, subfolder="text_encoder_2", mesh=mesh)
        return cls(clip, t5, (tok("tokenizer"), tok("tokenizer_2")), dtype)

    def layout(self, n: int) -> list[tuple[str, slice, slice, slice]]:
        """(name, context rows, context channels, pooled channels) of each encoder's part of the output,
        for `n` T5 tokens."""
        return [("clip", slice(0, 0), slice(0, 0), slice(0, self.clip.config.width)),
                ("t5", slice(0, n), slice(0, self.t5.config.d_model), slice(0, 0))]

    def __init__(self, clip, t5, tokenizers, dtype):
        self.clip, self.t5 = clip, t5
        self.tok_clip, self.tok_t5 = tokenizers
        self.clip_length = self.tok_clip.model_max_length
        self.dtype = dtype
        self._fn = jax.jit(self._encode)

    def _encode(self, params, ids_clip, ids_t5):
        pc, pt = params
        pooled = self.clip.module(pc)(ids_clip)["pooled"]
        context = self.t5.module(pt)(ids_t5)
        return context.astype(self.dtype), pooled.astype(self.dtype)

    def __call__(self, prompts, max_sequence_length=None):
        prompts = prompt_list(prompts)
        n = check_length(max_sequence_length or self.default_max_sequence_length)
        ids_clip = tokenize(self.tok_clip, prompts, self.clip_length)
        ids_t5 = tokenize(self.tok_t5, prompts, n)
        return self._fn((self.clip.params, self.t5.params), ids_clip, ids_t5)
