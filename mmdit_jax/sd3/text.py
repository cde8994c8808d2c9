"""SD3's text encoders: CLIP-L + CLIP-G (+ T5) as StableDiffusion3Pipeline's `encode_prompt` combines them.

Context = [CLIP-L penultimate ++ CLIP-G penultimate (channels), zero-padded to the T5 width ; T5 last
hidden state] on the sequence axis; pooled = [CLIP-L text_embeds ++ CLIP-G text_embeds]. Both CLIP
tokenizers pad to the first tokenizer's model_max_length; T5 pads to max_sequence_length (default 256).
Without text_encoder_3 the T5 part is zeros of shape (B, max_sequence_length, transformer.joint_attention_dim).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.sources import read_json
from mmdit_jax.text.encoders import check_length, pipeline_component, prompt_list
from mmdit_jax.text.tokenizers import tokenize
from mmdit_jax.text.weights import load_clip, load_t5


def _span(start: int, stop: int, limit: int) -> slice:
    return slice(min(start, limit), min(stop, limit))


class SD3TextEncoders:
    """CLIP-L + CLIP-G (+ T5, optional) as StableDiffusion3Pipeline combines them."""

    family = "sd3"
    default_max_sequence_length = 256

    @classmethod
    def context_length(cls, max_sequence_length: int | None = None) -> int:
        """Context rows per prompt: the CLIP rows, then T5's."""
        from mmdit_jax.text.clip import CLIPTextConfig

        return CLIPTextConfig.max_positions + (max_sequence_length or cls.default_max_sequence_length)

    @classmethod
    def from_pipeline(cls, path: str, index: dict, dtype, mesh, tok) -> "SD3TextEncoders":
        """From a StableDiffusion3Pipeline folder; `tok(name)` loads a tokenizer folder."""
        clip_l = load_clip(path, dtype, subfolder="text_encoder", mesh=mesh)
        clip_g = load_clip(path, dtype, subfolder="text_encoder_2", mesh=mesh)
        for name, enc in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
            if enc.config.projection_dim is None:
                raise MMDiTError(f"{path}/{name}: SD3 needs CLIPTextModelWithProjection weights "
                                 "(no text_projection.weight found)")
        has_t5 = pipeline_component(index, "text_encoder_3") is not None
        t5 = load_t5(path, dtype, subfolder="text_encoder_3", mesh=mesh) if has_t5 else None
        joint = 4096
        tcfg = os.path.join(path, "transformer", "config.json")
        if os.path.isfile(tcfg):
            joint = int(read_json(tcfg).get("joint_attention_dim", joint))
        toks = (tok("tokenizer"), tok("tokenizer_2"), tok("tokenizer_3") if has_t5 else None)
        return cls(clip_l, clip_g, t5, toks, joint, dtype)

    def layout(self, n: int) -> list[tuple[str, slice, slice, slice]]:
        """(name, context rows, context channels, pooled channels) of each encoder's part of the output,
        for `n` T5 tokens."""
        width, rows = self.width, self.clip_length
        wl, wg = self.clip_l.config.width, self.clip_g.config.width
        pl, pg = self.clip_l.config.projection_dim, self.clip_g.config.projection_dim
        segments = [("clip_l", slice(0, rows), _span(0, wl, width), slice(0, pl)),
                    ("clip_g", slice(0, rows), _span(wl, wl + wg, width), slice(pl, pl + pg))]
        if self.t5 is not None:  # without T5 that part is zeros already: nothing to drop
            segments.append(("t5", slice(rows, rows + n), slice(0, width), slice(0, 0)))
        return segments

    def __init__(self, clip_l, clip_g, t5, tokenizers, joint_attention_dim: int, dtype):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tok_l, self.tok_g, self.tok_t5 = tokenizers
        self.clip_length = self.tok_l.model_max_length  # diffusers: tokenizer_max_length, for both CLIPs
        self.width = t5.config.d_model if t5 is not None else joint_attention_dim
        self.dtype = dtype
        self._fn = jax.jit(self._encode)

    def _encode(self, params, ids_l, ids_g, ids_t5):
        pl, pg, pt = params
        out_l = self.clip_l.module(pl)(ids_l)
        out_g = self.clip_g.module(pg)(ids_g)
        # clip_skip None -> hidden_states[-2]: the penultimate layer, before the final LayerNorm
        clip = jnp.concatenate([out_l["hidden_states"][-2], out_g["hidden_states"][-2]], axis=-1)
        pooled = jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
        if self.t5 is not None:
            t5 = self.t5.module(pt)(ids_t5)
        else:
            t5 = jnp.zeros((*ids_t5.shape, self.width), jnp.float32)
        # torch.nn.functional.pad to the T5 width (a negative pad would crop, so crop too)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, max(self.width - clip.shape[-1], 0))))[..., :self.width]
        # each part is cast to its encoder's dtype in diffusers; all share `dtype` here
        context = jnp.concatenate([clip.astype(self.dtype), t5.astype(self.dtype)], axis=1)
        return context, pooled.astype(self.dtype)

    def __call__(self, prompts, max_sequence_length=None):
        prompts = prompt_list(prompts)
        n = check_length(max_sequence_length or self.default_max_sequence_length)
        ids_l = tokenize(self.tok_l, prompts, self.clip_length)
        ids_g = tokenize(self.tok_g, prompts, self.clip_length)
        ids_t5 = (tokenize(self.tok_t5, prompts, n) if self.t5 is not None
                  else np.zeros((len(prompts), n), np.int32))
        params = (self.clip_l.params, self.clip_g.params, self.t5.params if self.t5 is not None else None)
        return self._fn(params, ids_l, ids_g, ids_t5)
