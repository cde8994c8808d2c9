"""Qwen3 / Mistral checkpoints (transformers layout, sharded or not) -> DecoderLM parameters.

Accepted configs: model_type "qwen3" (Qwen3ForCausalLM / Qwen3Model), "mistral" (MistralForCausalLM /
MistralModel) and "mistral3" (Mistral3ForConditionalGeneration: its `text_config` language model; the
vision tower, projector and LM head are not read). Key spellings differ by class and by the transformers
version that saved them (`model.`, `model.language_model.`, `language_model.model.`), so the language
model's prefix is found from where `embed_tokens.weight` sits.

`layers=n` below the model's depth loads only the first n layers (no final norm): FLUX.2 reads hidden
states 27 of 36 (klein) and 30 of 40 (dev), so a quarter of the encoder is never read.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.sources import open_component
from mmdit_jax.text.decoder import DecoderConfig, DecoderLM
from mmdit_jax.text.weights import LAYOUT, KeyView, Loaded, _loaded, _plan, _rule, _structure
from mmdit_jax.dtypes import parse_dtype

# where the language model's tensors sit, by saving class and transformers version
PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
MODEL_TYPES = ("qwen3", "mistral", "mistral3")


def _rope_theta(cfg: dict, origin: str) -> float:
    """rope_theta from either spelling (`rope_parameters` in transformers 5, top-level before); only
    plain RoPE (no scaling) is supported."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise MMDiTError(f"{origin}: RoPE type {kind!r} is not supported (only plain rotary embeddings)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def decoder_config_from_json(cfg: dict, origin: str) -> DecoderConfig:
    """The language model's DecoderConfig from a transformers config.json (all layers, final norm)."""
    model_type = cfg.get("model_type")
    if model_type == "mistral3":
        cfg = cfg.get("text_config")
        if not isinstance(cfg, dict) or cfg.get("model_type", "mistral") != "mistral":
            raise MMDiTError(f"{origin}/config.json: Mistral3 text_config must be a Mistral language model")
        model_type = "mistral"
    if model_type not in MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or model_type
        raise MMDiTError(f"{origin}/config.json: text encoder architecture {arch!r} is not a Qwen3 or Mistral "
                         "language model (model_type qwen3, mistral or mistral3)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise MMDiTError(f"{origin}/config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    qwen = model_type == "qwen3"
    if qwen and cfg.get("use_sliding_window"):
        raise MMDiTError(f"{origin}/config.json: use_sliding_window is not supported for Qwen3 "
                         "(its layers would differ in masking)")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or (128 if qwen else hidden // heads)  # the classes' defaults
        return DecoderConfig(
            vocab_size=int(cfg["vocab_size"]), hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            ffn=int(cfg["intermediate_size"]), rope_theta=_rope_theta(cfg, origin),
            eps=float(cfg.get("rms_norm_eps", 1e-6)), qk_norm=qwen,
            attention_bias=bool(cfg.get("attention_bias", False)) if qwen else False,
            sliding_window=None if qwen else cfg.get("sliding_window", 4096))
    except KeyError as e:
        raise MMDiTError(f"{origin}/config.json: missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise MMDiTError(f"{origin}/config.json: bad language model settings ({e})") from None


def decoder_plan(cfg: DecoderConfig):
    top = [_rule("embed", "embed_tokens.weight")]
    if cfg.final_norm:
        top.append(_rule("norm.scale", "norm.weight"))
    layer = [_rule("input_norm.scale", "input_layernorm.weight"),
             _rule("post_norm.scale", "post_attention_layernorm.weight")]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        layer.append(_rule(f"{ours}.kernel", f"self_attn.{theirs}.weight", "linear"))
        if cfg.attention_bias:
            layer.append(_rule(f"{ours}.bias", f"self_attn.{theirs}.bias"))
    if cfg.qk_norm:
        layer += [_rule("q_norm.scale", "self_attn.q_norm.weight"), _rule("k_norm.scale", "self_attn.k_norm.weight")]
    layer += [_rule(f"{ours}.kernel", f"mlp.{theirs}.weight", "linear")
              for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))]
    return _plan(top, layer, "layers.{}.", cfg.layers)


def decoder_view(tensors, cfg: DecoderConfig, origin: str) -> KeyView:
    """The language model's tensors under their bare names (`embed_tokens.weight`, `layers.0...`),
    without the layers after `cfg.layers` (and the final norm when `cfg` has none)."""
    prefix = next((p for p in PREFIXES if p + "embed_tokens.weight" in tensors), None)
    if prefix is None:
        raise MMDiTError(f"{origin}: not a language model checkpoint (no embed_tokens.weight under "
                         f"{', '.join(repr(p) for p in PREFIXES if p)} or at the top)")
    names = {}
    for key in tensors:
        if not key.startswith(prefix):
            continue  # the LM head, a vision tower and projector
        name = key[len(prefix):]
        if prefix == "" and name.startswith(("lm_head.", "model.")):
            continue
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= cfg.layers:
            continue
        if (name == "norm.weight" and not cfg.final_norm) or name.endswith("rotary_emb.inv_freq"):
            continue
        names[name] = key
    return KeyView(tensors, names)


def decoder_weights(path, dtype=jnp.float32, *, subfolder: str = "text_encoder",
                    layers: int | None = None) -> ComponentWeights:
    """Config, abstract params and the source of a Qwen3 / Mistral language model (nothing read).
    `layers`: load only the first `layers` layers (None: all, with the final norm)."""
    dtype = parse_dtype(dtype)
    src = open_component(path, subfolder)
    if src.config is None:
        raise MMDiTError(f"{src.origin}: a Qwen3 / Mistral text encoder loads from a folder with config.json "
                         "and safetensors (single files are not supported)")
    cfg = decoder_config_from_json(src.config, src.origin)
    if layers is not None and layers < cfg.layers and not src.orbax:  # Orbax folders hold the whole model
        cfg = dataclasses.replace(cfg, layers=max(int(layers), 1), final_norm=False)
    template = _structure(DecoderLM, cfg, dtype).abstract_params()
    if src.orbax:
        return ComponentWeights(cfg, template, src.origin)
    view = decoder_view(src.tensors, cfg, src.origin)
    return ComponentWeights(cfg, template, src.origin, decoder_plan(cfg), view, LAYOUT)


def load_decoder(path, dtype=jnp.float32, *, subfolder: str = "text_encoder", layers: int | None = None,
                 mesh=None) -> Loaded:
    """A Qwen3 / Mistral language model from a pipeline folder's `subfolder` or a transformers folder;
    `mesh`: each parameter read straight into its shards (logical-axis rules)."""
    w = decoder_weights(path, dtype, subfolder=subfolder, layers=layers)
    return _loaded(DecoderLM, w, dtype, mesh)
