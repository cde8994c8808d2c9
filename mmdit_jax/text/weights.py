"""Text-encoder checkpoints (transformers key layout) -> CLIPText / T5Encoder parameters.

Sources: a diffusers pipeline folder (text_encoder*/ subfolders), a transformers model folder
(config.json + model.safetensors, maybe sharded), or a single file: clip_l / clip_g / t5xxl files as
ComfyUI ships them, or an SD3 file bundling them under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`.
Key spellings differ between these (`text_model.` is present or not depending on the class and the
transformers version; T5 ties `shared` and `encoder.embed_tokens`), so keys are first normalised to one
canonical spelling, then mapped by a declarative plan (io.rules) that reports every missing, unexpected
or mis-shaped tensor at once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import orbax_io, rules
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.rules import Entry, Rule, tree_path
from mmdit_jax.io.sources import open_component
from mmdit_jax.text.clip import ACTIVATIONS, CLIPText, CLIPTextConfig
from mmdit_jax.text.t5 import T5Config, T5Encoder
from mmdit_jax.structure import Structure
from mmdit_jax.dtypes import parse_dtype

LAYOUT = "transformers"
# SD3 single files bundle the text encoders under these prefixes.
BUNDLES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
           "t5xxl": "text_encoders.t5xxl.transformer."}


def _rule(path: str, key: str, kind: str = "vector") -> Rule:
    return Rule(path, {LAYOUT: (key,)}, kind)


def _plan(top, layer, layer_prefix: str, n: int) -> list[Entry]:
    entries = [Entry(tree_path(r.path), r) for r in top]
    prefixes = {LAYOUT: tuple(layer_prefix.format(i) for i in range(n))}
    entries += [Entry(("layers", "blocks") + tree_path(r.path), r, prefixes) for r in layer]
    return entries


def clip_plan(cfg: CLIPTextConfig) -> list[Entry]:
    top = [_rule("token_embedding", "embeddings.token_embedding.weight"),
           _rule("position_embedding", "embeddings.position_embedding.weight"),
           _rule("final_ln.scale", "final_layer_norm.weight"), _rule("final_ln.bias", "final_layer_norm.bias")]
    if cfg.projection_dim:
        top.append(_rule("text_projection.kernel", "text_projection.weight", "linear"))
    layer = [_rule("ln1.scale", "layer_norm1.weight"), _rule("ln1.bias", "layer_norm1.bias"),
             _rule("ln2.scale", "layer_norm2.weight"), _rule("ln2.bias", "layer_norm2.bias")]
    for ours, theirs in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                         ("out", "self_attn.out_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
        layer += [_rule(f"{ours}.kernel", f"{theirs}.weight", "linear"), _rule(f"{ours}.bias", f"{theirs}.bias")]
    return _plan(top, layer, "encoder.layers.{}.", cfg.layers)


def t5_plan(cfg: T5Config) -> list[Entry]:
    top = [_rule("shared", "shared.weight"),
           _rule("rel_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
           _rule("final_ln.scale", "encoder.final_layer_norm.weight")]
    layer = [_rule("ln_attn.scale", "layer.0.layer_norm.weight"), _rule("ln_ff.scale", "layer.1.layer_norm.weight")]
    layer += [_rule(f"{n}.kernel", f"layer.0.SelfAttention.{n}.weight", "linear") for n in "qkvo"]
    layer += [_rule(f"{n}.kernel", f"layer.1.DenseReluDense.{n}.weight", "linear") for n in ("wi_0", "wi_1", "wo")]
    return _plan(top, layer, "encoder.block.{}.", cfg.layers)


class KeyView(Mapping):
    """`base` seen under canonical names: canonical -> original key."""

    def __init__(self, base: Mapping, names: dict[str, str]):
        self.base, self.names = base, names

    def shape(self, k):
        src = self.names[k]
        return self.base.shape(src) if hasattr(self.base, "shape") else np.shape(self.base[src])

    def __getitem__(self, k):
        return self.base[self.names[k]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def clip_view(tensors: Mapping, prefix: str = "") -> KeyView:
    names = {}
    for k in tensors:
        if not k.startswith(prefix):
            continue
        c = k[len(prefix):]
        # CLIPTextModelWithProjection (and CLIPTextModel before transformers 5) nest the tower under
        # `text_model.`; `position_ids` is an index buffer older exports saved, not a weight.
        c = c[len("text_model."):] if c.startswith("text_model.") else c
        if c.endswith("position_ids") or c == "logit_scale":
            continue
        names[c] = k
    return KeyView(tensors, names)


def t5_view(tensors: Mapping, prefix: str = "") -> KeyView:
    names = {}
    for k in tensors:
        if not k.startswith(prefix):
            continue
        c = k[len(prefix):]
        if c.startswith(("decoder.", "lm_head.")):  # full T5 checkpoints: the encoder is all we need
            continue
        names[c] = k
    # `encoder.embed_tokens` is tied to `shared`; files hold either or both.
    if "encoder.embed_tokens.weight" in names:
        tied = names.pop("encoder.embed_tokens.weight")
        names.setdefault("shared.weight", tied)
    return KeyView(tensors, names)


def _shape(view: KeyView, key: str, origin: str):
    if key not in view:
        raise MMDiTError(f"{origin}: not a text encoder checkpoint of the expected kind (no {key!r})")
    return tuple(view.shape(key))


def _count(view: KeyView, fmt: str) -> int:
    n = 0
    while fmt.format(n) in view:
        n += 1
    return n


def clip_config_from_json(cfg: dict, proj: int | None, origin: str) -> CLIPTextConfig:
    """`proj`: the text_projection width the weights hold (None: no projection)."""
    cfg = cfg.get("text_config", cfg)  # a full CLIPConfig nests the text tower's settings
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise MMDiTError(f"{origin}: unsupported CLIP activation {act!r}")
    return CLIPTextConfig(vocab_size=cfg.get("vocab_size", 49408), width=cfg.get("hidden_size", 512),
                          layers=cfg.get("num_hidden_layers", 12), heads=cfg.get("num_attention_heads", 8),
                          ffn=cfg.get("intermediate_size", 2048), max_positions=cfg.get("max_position_embeddings", 77),
                          act=act, eps=cfg.get("layer_norm_eps", 1e-5), projection_dim=proj,
                          eos_token_id=cfg.get("eos_token_id", 49407))


def clip_config_to_json(cfg: CLIPTextConfig) -> dict:
    """A transformers config.json for `cfg` (what mmdit-convert writes for towers from single files)."""
    out = {"architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
           "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.width,
           "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "intermediate_size": cfg.ffn,
           "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.act, "layer_norm_eps": cfg.eps,
           "eos_token_id": cfg.eos_token_id}
    if cfg.projection_dim:
        out["projection_dim"] = cfg.projection_dim
    return out


def t5_config_to_json(cfg: T5Config) -> dict:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.layers,
            "num_heads": cfg.heads, "relative_attention_num_buckets": cfg.num_buckets,
            "relative_attention_max_distance": cfg.max_distance, "layer_norm_epsilon": cfg.eps,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "is_encoder_decoder": False, "use_cache": False}


def clip_config_from_weights(view: KeyView, origin: str, act: str | None = None) -> CLIPTextConfig:
    """Sizes from shapes. Not in the shapes: head count (CLIP-L and bigG both use 64-wide heads), the
    activation (OpenCLIP bigG, the only 1280-wide tower, uses exact GELU; OpenAI CLIP quick_gelu) and the
    pooling rule (argmax of ids, as the SAI/BFL references and the released configs do)."""
    vocab, width = _shape(view, "embeddings.token_embedding.weight", origin)
    proj = view.shape("text_projection.weight")[0] if "text_projection.weight" in view else None
    return CLIPTextConfig(vocab_size=vocab, width=width, layers=_count(view, "encoder.layers.{}.mlp.fc1.weight"),
                          heads=max(width // 64, 1), ffn=_shape(view, "encoder.layers.0.mlp.fc1.weight", origin)[0],
                          max_positions=_shape(view, "embeddings.position_embedding.weight", origin)[0],
                          act=act or ("gelu" if width == 1280 else "quick_gelu"), projection_dim=proj,
                          eos_token_id=2)


def t5_config_from_json(cfg: dict, origin: str) -> T5Config:
    ff = cfg.get("feed_forward_proj", "relu")
    if ff not in ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh"):
        raise MMDiTError(f"{origin}: only T5 v1.1 encoders (feed_forward_proj 'gated-gelu') are supported, "
                         f"this one has {ff!r}")
    return T5Config(vocab_size=cfg.get("vocab_size", 32128), d_model=cfg.get("d_model", 512),
                    d_kv=cfg.get("d_kv", 64), d_ff=cfg.get("d_ff", 2048), layers=cfg.get("num_layers", 6),
                    heads=cfg.get("num_heads", 8), num_buckets=cfg.get("relative_attention_num_buckets", 32),
                    max_distance=cfg.get("relative_attention_max_distance", 128),
                    eps=cfg.get("layer_norm_epsilon", 1e-6))


def t5_config_from_weights(view: KeyView, origin: str) -> T5Config:
    """Sizes from shapes; the bias' max distance (128) and eps (1e-6) are T5 v1.1's fixed values."""
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in view:
        raise MMDiTError(f"{origin}: not a T5 v1.1 encoder (no gated feed-forward "
                         "encoder.block.0.layer.1.DenseReluDense.wi_0.weight)")
    vocab, d = _shape(view, "shared.weight", origin)
    buckets, heads = _shape(view, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", origin)
    inner = _shape(view, "encoder.block.0.layer.0.SelfAttention.q.weight", origin)[0]
    return T5Config(vocab_size=vocab, d_model=d, d_kv=inner // heads,
                    d_ff=view.shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
                    layers=_count(view, "encoder.block.{}.layer.0.SelfAttention.q.weight"), heads=heads,
                    num_buckets=buckets)


@dataclasses.dataclass
class Loaded:
    """A text encoder's config, structure and parameters (a pure dict of jax arrays)."""
    config: object
    structure: Structure
    params: dict

    def module(self, params=None) -> nnx.Module:
        """The nnx module holding `params` (default: the loaded ones); cheap, fine inside jit."""
        return self.structure.module(self.params if params is None else params)


@functools.lru_cache(maxsize=16)
def _structure(module_cls, cfg, dtype) -> Structure:
    return Structure(nnx.eval_shape(lambda: module_cls(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))))


def build(module_cls, cfg, plan, view, dtype, origin) -> Loaded:
    """`module_cls(cfg)` with every parameter filled from `view` (nothing random is materialised)."""
    structure = _structure(module_cls, cfg, dtype)
    params = rules.import_params(plan, view, LAYOUT, structure.abstract_params(), origin)
    return Loaded(cfg, structure, params)


def _pick_bundle(tensors: Mapping, prefix: str | None, kinds: tuple[str, ...], bare_key: str, origin: str,
                 nested: str = "") -> str:
    """The key prefix of the wanted model inside a single file: explicit, bare, or the one bundle present.
    `nested` is a module name some layouts put before `bare_key` (kept: the view strips it)."""
    if prefix is not None:
        return BUNDLES.get(prefix, prefix)
    keys = list(tensors)
    for k in keys:
        if k.endswith(bare_key) and not k.startswith("text_encoders."):
            pre = k[: len(k) - len(bare_key)]
            return pre[: len(pre) - len(nested)] if nested and pre.endswith(nested) else pre
    present = [n for n in kinds if any(k.startswith(BUNDLES[n]) for k in keys)]
    if len(present) == 1:
        return BUNDLES[present[0]]
    if not present:
        raise MMDiTError(f"{origin}: no {' or '.join(kinds)} text encoder in this file")
    raise MMDiTError(f"{origin}: holds several text encoders ({', '.join(present)}); choose one with prefix=")


def _saved_projection(folder: str) -> int | None:
    shape = orbax_io.saved_leaves(folder).get(("text_projection", "kernel"), (None,))[0]
    return shape[1] if shape else None


def clip_weights(path, dtype=jnp.float32, *, subfolder: str = "text_encoder", prefix: str | None = None,
                 act: str | None = None, identity_projection: bool = False) -> ComponentWeights:
    """Config, abstract params and the source of a CLIP text tower (see `load_clip`; nothing read)."""
    dtype = parse_dtype(dtype)
    src = open_component(path, subfolder)
    if src.orbax:
        cfg = clip_config_from_json(src.config, _saved_projection(src.origin), src.origin)
        return ComponentWeights(cfg, _structure(CLIPText, cfg, dtype).abstract_params(), src.origin)
    if src.config is not None:
        view = clip_view(src.tensors)
        proj = view.shape("text_projection.weight")[0] if "text_projection.weight" in view else None
        cfg = clip_config_from_json(src.config, proj, src.origin)
    else:
        pre = _pick_bundle(src.tensors, prefix, ("clip_l", "clip_g"), "embeddings.token_embedding.weight",
                           src.origin, nested="text_model.")
        view = clip_view(src.tensors, pre)
        act = act or ("gelu" if pre == BUNDLES["clip_g"] else None)
        cfg = clip_config_from_weights(view, src.origin, act)
    if cfg.projection_dim is None and identity_projection:
        eye = np.eye(cfg.width, dtype=np.float32)
        view = KeyView({**{k: view[k] for k in view}, "text_projection.weight": eye},
                       {**{k: k for k in view}, "text_projection.weight": "text_projection.weight"})
        cfg = dataclasses.replace(cfg, projection_dim=cfg.width)
    template = _structure(CLIPText, cfg, dtype).abstract_params()
    return ComponentWeights(cfg, template, src.origin, clip_plan(cfg), view, LAYOUT)


def _loaded(module_cls, w: ComponentWeights, dtype, mesh) -> Loaded:
    """`w`'s parameters read straight into their shards on `mesh` (the logical-axis rules, as for the
    transformer) when given, else onto the default device."""
    structure = _structure(module_cls, w.config, parse_dtype(dtype))
    return Loaded(w.config, structure, w.params(structure.shardings(mesh) if mesh is not None else None))


def load_clip(path, dtype=jnp.float32, *, subfolder: str = "text_encoder", prefix: str | None = None,
              act: str | None = None, identity_projection: bool = False, mesh=None) -> Loaded:
    """A CLIP text tower from a pipeline folder, a transformers folder, an Orbax folder written by
    mmdit-convert, or a single file.

    `prefix` picks a model inside a single file ("clip_l", "clip_g" or a literal key prefix).
    `identity_projection`: give a file without `text_projection` an identity one, as diffusers does for
    the CLIP-L bundled in SD3 files (SD3 uses CLIPTextModelWithProjection's text_embeds).
    `mesh`: parameters sharded over it by the logical-axis rules."""
    w = clip_weights(path, dtype, subfolder=subfolder, prefix=prefix, act=act,
                     identity_projection=identity_projection)
    return _loaded(CLIPText, w, dtype, mesh)


def t5_weights(path, dtype=jnp.float32, *, subfolder: str = "text_encoder_3",
               prefix: str | None = None) -> ComponentWeights:
    """Config, abstract params and the source of a T5 encoder (see `load_t5`; nothing read)."""
    dtype = parse_dtype(dtype)
    src = open_component(path, subfolder)
    if src.orbax:
        cfg = t5_config_from_json(src.config, src.origin)
        return ComponentWeights(cfg, _structure(T5Encoder, cfg, dtype).abstract_params(), src.origin)
    if src.config is not None:
        view = t5_view(src.tensors)
        cfg = t5_config_from_json(src.config, src.origin)
    else:
        pre = _pick_bundle(src.tensors, prefix, ("t5xxl",), "encoder.final_layer_norm.weight", src.origin)
        view = t5_view(src.tensors, pre)
        cfg = t5_config_from_weights(view, src.origin)
    template = _structure(T5Encoder, cfg, dtype).abstract_params()
    return ComponentWeights(cfg, template, src.origin, t5_plan(cfg), view, LAYOUT)


def load_t5(path, dtype=jnp.float32, *, subfolder: str = "text_encoder_3", prefix: str | None = None,
            mesh=None) -> Loaded:
    """A T5 encoder from a pipeline folder, a transformers folder, an Orbax folder written by
    mmdit-convert, or a single file (`prefix`: "t5xxl" or a literal key prefix inside a bundled file).
    `mesh`: parameters sharded over it by the logical-axis rules (T5-XXL is 19 GB in float32)."""
    w = t5_weights(path, dtype, subfolder=subfolder, prefix=prefix)
    return _loaded(T5Encoder, w, dtype, mesh)
