"""FLUX.2 prompt encoding, as diffusers' Flux2KleinPipeline (Qwen3) and Flux2Pipeline (Mistral 3) build it.

klein (`_get_qwen3_prompt_embeds`): each prompt is one user message, wrapped by the tokenizer's chat
template with add_generation_prompt=True and enable_thinking=False, and tokenized on its own
(padding="max_length", truncation, max_sequence_length).
dev (`_get_mistral_3_small_prompt_embeds`): each prompt ("[IMG]" removed) follows a system message, both
as lists of text parts; the processor's chat template renders them (add_generation_prompt=False) and the
texts are tokenized together as the processor does it: special tokens are added only when the rendered
text does not already start with BOS. The processor itself is not needed (PixtralProcessor wants
torchvision): its tokenizer and chat template give the same ids.
Both run the language model with the tokenizer's attention mask and stack hidden_states[k], k in
`layers`, on the channel axis: context (B, L, len(layers) * hidden) in the encoder's dtype; no pooled
vector.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.text.decoder_weights import load_decoder
from mmdit_jax.text.encoders import check_length, prompt_list
from mmdit_jax.dtypes import parse_dtype

KLEIN_LAYERS = (9, 18, 27)
DEV_LAYERS = (10, 20, 30)
# diffusers' pipelines/flux2/system_messages.py SYSTEM_MESSAGE (from BFL's flux2 repository)
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing "
                  "on object relationships, object\nattribution and actions without speculation.")


def klein_tokens(tokenizer, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), (B, max_length) int32 each, as Flux2KleinPipeline builds them."""
    ids, masks = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        out = tokenizer(text, return_tensors="np", padding="max_length", truncation=True, max_length=max_length)
        ids.append(out["input_ids"])
        masks.append(out["attention_mask"])
    return np.concatenate(ids).astype(np.int32), np.concatenate(masks).astype(np.int32)


def dev_messages(prompts: list[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    return [[{"role": "system", "content": [{"type": "text", "text": system_message}]},
             {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]


def dev_tokens(tokenizer, chat_template: str, prompts: list[str], max_length: int,
               system_message: str = SYSTEM_MESSAGE) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), (B, max_length) int32 each, as Flux2Pipeline's processor builds them."""
    texts = tokenizer.apply_chat_template(dev_messages(prompts, system_message), chat_template=chat_template,
                                          tokenize=False, add_generation_prompt=False)
    bos = tokenizer.bos_token
    special = not (bos is not None and texts[0].startswith(bos))
    out = tokenizer(texts, return_tensors="np", padding="max_length", truncation=True, max_length=max_length,
                    add_special_tokens=special)
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def processor_chat_template(folder: str, tokenizer) -> str:
    """The chat template a processor saved in `folder` uses (its own file first, then the tokenizer's)."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                template = json.load(f).get("chat_template")
            if isinstance(template, str):
                return template
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    raise MMDiTError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


def _load_tokenizer(folder: str):
    if not os.path.isdir(folder):
        raise MMDiTError(f"{folder}: no such tokenizer folder")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means unusable tokenizer files
        raise MMDiTError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


class Flux2TextEncoders:
    """A Qwen3 (klein) or Mistral (dev) language model and its tokenizer, as the FLUX.2 pipelines use them.

    `enc(prompts, max_sequence_length=None) -> (context (B, L, len(layers) * hidden), None)`."""

    family = "flux2"
    default_max_sequence_length = 512

    @classmethod
    def context_length(cls, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or cls.default_max_sequence_length

    @classmethod
    def from_pipeline(cls, path: str, index: dict, dtype, mesh, tok) -> "Flux2TextEncoders":
        """From a Flux2Pipeline (dev) or Flux2Klein*Pipeline (klein) folder; its tokenizer is loaded with
        transformers' AutoTokenizer (the chat template comes with it), not `tok`."""
        variant = "klein" if str(index.get("_class_name", "")).startswith("Flux2Klein") else "dev"
        return load_flux2_text_encoders(path, dtype, mesh, variant=variant)

    def layout(self, n: int) -> list[tuple[str, slice, slice, slice]]:
        """(name, context rows, context channels, pooled channels): one language model, no pooled vector."""
        return [("decoder", slice(0, n), slice(0, self.width), slice(0, 0))]

    def __init__(self, model, tokenize, layers, dtype):
        """`model`: a Loaded DecoderLM; `tokenize(prompts, max_length) -> (ids, mask)`."""
        self.model, self.tokenize, self.dtype = model, tokenize, dtype
        self.layers = model.module().check_layers(layers)
        self.width = len(self.layers) * model.config.hidden
        self._fn = jax.jit(self._encode)

    def _encode(self, params, ids, mask):
        hidden = self.model.module(params)(ids, mask, self.layers)  # (k, B, L, D)
        k, b, length, d = hidden.shape
        # diffusers: stack on dim 1, permute to (B, L, k, D), reshape: layer j fills channels j*D .. (j+1)*D
        return jnp.transpose(hidden, (1, 2, 0, 3)).reshape(b, length, k * d).astype(self.dtype)

    def __call__(self, prompts, max_sequence_length=None):
        prompts = prompt_list(prompts)
        n = check_length(max_sequence_length or self.default_max_sequence_length)
        ids, mask = self.tokenize(prompts, n)
        return self._fn(self.model.params, ids, mask), None


def load_flux2_text_encoders(path, dtype="float32", mesh=None, *, variant: str, layers=None):
    """The text encoder + tokenizer of a Flux2Pipeline (`variant` "dev") or Flux2KleinPipeline ("klein")
    folder. `layers`: the hidden-state indices stacked (default: the pipeline's (10, 20, 30) /
    (9, 18, 27), `text_encoder_out_layers` in diffusers). Only the layers up to the deepest one are
    loaded. `mesh`: parameters read straight into their shards."""
    if variant not in ("dev", "klein"):
        raise ValueError(f"variant must be 'dev' or 'klein', got {variant!r}")
    dtype = parse_dtype(dtype)
    path = paths.local(os.fspath(path))
    layers = tuple(layers if layers is not None else (DEV_LAYERS if variant == "dev" else KLEIN_LAYERS))
    if not layers:
        raise MMDiTError("layers must name at least one hidden state")
    deepest = max(layers) if min(layers) >= 0 else None  # negative indices count from the end: load all
    model = load_decoder(path, dtype, subfolder="text_encoder", layers=deepest, mesh=mesh)
    folder = os.path.join(path, "tokenizer")
    tokenizer = _load_tokenizer(folder)
    if variant == "klein":
        def tokenize(prompts, n):
            return klein_tokens(tokenizer, prompts, n)
    else:
        template = processor_chat_template(folder, tokenizer)

        def tokenize(prompts, n):
            return dev_tokens(tokenizer, template, prompts, n)
    try:
        return Flux2TextEncoders(model, tokenize, layers, dtype)
    except ValueError as e:
        raise MMDiTError(f"{path}/text_encoder: {e}") from None
