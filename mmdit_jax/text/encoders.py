"""`load_text_encoders`: a family's tokenizers + encoders, building what diffusers' `encode_prompt` builds.

SD3 (StableDiffusion3Pipeline): context = [CLIP-L penultimate ++ CLIP-G penultimate (channels), zero-padded
to the T5 width ; T5 last hidden state] on the sequence axis; pooled = [CLIP-L text_embeds ++ CLIP-G
text_embeds]. Both CLIP tokenizers pad to the first tokenizer's model_max_length; T5 pads to
max_sequence_length (default 256). Without text_encoder_3 the T5 part is zeros of shape
(B, max_sequence_length, transformer.joint_attention_dim).
FLUX (FluxPipeline): context = T5 last hidden state (max_sequence_length default 512); pooled = CLIP-L
pooler_output (no projection).
Each call tokenizes on the host and runs one jitted function, compiled once per (batch, length).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.io import paths
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.sources import read_json
from mmdit_jax.text.tokenizers import load_tokenizer, tokenize
from mmdit_jax.text.weights import load_clip, load_t5
from mmdit_jax.transformer import parse_dtype

def _component(index: dict, name: str) -> str | None:
    """The class model_index.json names for a component, or None when it is absent (null)."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return entry[1]


def _prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise MMDiTError("prompts must be a string or a non-empty list of strings")
    return prompts


def _check_length(n, name="max_sequence_length"):
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise MMDiTError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


class SD3TextEncoders:
    """CLIP-L + CLIP-G (+ T5, optional) as StableDiffusion3Pipeline combines them."""

    family = "sd3"
    default_max_sequence_length = 256

    @classmethod
    def context_length(cls, max_sequence_length: int | None = None) -> int:
        """Context rows per prompt: the CLIP rows, then T5's."""
        from mmdit_jax.text.clip import CLIPTextConfig

        return CLIPTextConfig.max_positions + (max_sequence_length or cls.default_max_sequence_length)

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
        prompts = _prompts(prompts)
        n = _check_length(max_sequence_length or self.default_max_sequence_length)
        ids_l = tokenize(self.tok_l, prompts, self.clip_length)
        ids_g = tokenize(self.tok_g, prompts, self.clip_length)
        ids_t5 = (tokenize(self.tok_t5, prompts, n) if self.t5 is not None
                  else np.zeros((len(prompts), n), np.int32))
        params = (self.clip_l.params, self.clip_g.params, self.t5.params if self.t5 is not None else None)
        return self._fn(params, ids_l, ids_g, ids_t5)


class FluxTextEncoders:
    """CLIP-L (pooled) + T5 (context) as FluxPipeline combines them."""

    family = "flux"
    default_max_sequence_length = 512

    @classmethod
    def context_length(cls, max_sequence_length: int | None = None) -> int:
        """Context rows per prompt: T5's only (CLIP gives the pooled vector)."""
        return max_sequence_length or cls.default_max_sequence_length

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
        prompts = _prompts(prompts)
        n = _check_length(max_sequence_length or self.default_max_sequence_length)
        ids_clip = tokenize(self.tok_clip, prompts, self.clip_length)
        ids_t5 = tokenize(self.tok_t5, prompts, n)
        return self._fn((self.clip.params, self.t5.params), ids_clip, ids_t5)


ENCODERS = {c.family: c for c in (SD3TextEncoders, FluxTextEncoders)}  # by the transformer's family


def load_text_encoders(path, dtype="float32", mesh=None):
    """The text encoders of a diffusers SD3/SD3.5 or FLUX.1 pipeline folder; with `mesh`, their
    parameters are sharded over it by the logical-axis rules, as the transformer's are.

    Returns `enc` with `enc(prompts, max_sequence_length=None) -> (context, pooled)` jax arrays."""
    dtype = parse_dtype(dtype)
    path = paths.local(os.fspath(path))
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise MMDiTError(f"{path}: text encoders load from a diffusers pipeline folder (model_index.json "
                         "with its tokenizer*/ and text_encoder*/ folders)")
    index = read_json(index_path)
    cls = str(index.get("_class_name", ""))

    def tok(name):
        return load_tokenizer(path, name, _component(index, name))

    if cls.startswith("StableDiffusion3"):
        clip_l = load_clip(path, dtype, subfolder="text_encoder", mesh=mesh)
        clip_g = load_clip(path, dtype, subfolder="text_encoder_2", mesh=mesh)
        for name, enc in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
            if enc.config.projection_dim is None:
                raise MMDiTError(f"{path}/{name}: SD3 needs CLIPTextModelWithProjection weights "
                                 "(no text_projection.weight found)")
        has_t5 = _component(index, "text_encoder_3") is not None
        t5 = load_t5(path, dtype, subfolder="text_encoder_3", mesh=mesh) if has_t5 else None
        joint = 4096
        tcfg = os.path.join(path, "transformer", "config.json")
        if os.path.isfile(tcfg):
            joint = int(read_json(tcfg).get("joint_attention_dim", joint))
        toks = (tok("tokenizer"), tok("tokenizer_2"), tok("tokenizer_3") if has_t5 else None)
        return SD3TextEncoders(clip_l, clip_g, t5, toks, joint, dtype)
    if cls.startswith("Flux"):
        clip = load_clip(path, dtype, subfolder="text_encoder", mesh=mesh)
        t5 = load_t5(path, dtype, subfolder="text_encoder_2", mesh=mesh)
        return FluxTextEncoders(clip, t5, (tok("tokenizer"), tok("tokenizer_2")), dtype)
    raise MMDiTError(f"{index_path}: unsupported pipeline class {cls!r} (expected StableDiffusion3Pipeline "
                     "or FluxPipeline)")
