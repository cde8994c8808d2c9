"""`write_toy_pipeline`: a complete, freshly initialised pipeline folder for the toy world.

The folder is an ordinary diffusers-layout pipeline (model_index.json, scheduler/, tokenizer*/,
text_encoder*/, transformer/, vae/) that the library's loaders read like any released model:
- tokenizers built from the caption vocabulary (toy/tokenizers.py);
- text encoders of the real architectures (CLIP-L-like and CLIP-G-like with projections, a T5 v1.1
  encoder), tiny and randomly initialised with our JAX modules, saved in the transformers key layout:
  they stay frozen in training, random features of the caption are enough to condition on;
- a parameter-free pixel-space VAE (space-to-depth) described by vae/config.json;
- a small randomly initialised transformer (SD3 layout, or FLUX layout for variant="flux") saved in
  the diffusers layout through the same key plans as the converters;
- sampling defaults in model_index.json (`_sampling_defaults`, read by mj.Pipeline): what the trainer and
  sampler must agree on that no diffusers config holds (the image side and the T5 sequence length,
  which changes the context without an attention mask);
- toy.json: the ToyConfig the folder was written with.
The folder is written aside and renamed into place, so an interrupted call leaves nothing that looks
complete.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_named
from mmdit_jax.flux.config import FluxConfig
from mmdit_jax.io import paths, rules
from mmdit_jax.io.files import atomic_folder, write_json
from mmdit_jax.io.safetensors_io import save_file
from mmdit_jax.sampling.pipeline import SAMPLING_DEFAULTS_KEY
from mmdit_jax.sd3.config import MMDiTConfig
from mmdit_jax.text import weights as text_weights
from mmdit_jax.text.clip import CLIPText, CLIPTextConfig
from mmdit_jax.text.t5 import T5Config, T5Encoder
from mmdit_jax.toy import dataset, tokenizers
from mmdit_jax.transformer import Transformer
from mmdit_jax.vae.pixel import PixelSpaceConfig

DIFFUSERS_VERSION = "0.42.1"  # the format written; only fields every version reads are used
TRANSFORMERS_VERSION = "5.23.0"


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Everything a toy pipeline is made of."""
    variant: str = "sd3"  # "sd3" (SD3 layout) or "flux" (FLUX layout)
    resolution: int = 32
    vae_factor: int = 2  # pixel-space latents: space-to-depth by this factor
    clip_length: int = 16  # CLIP tokenizers' model_max_length (and position table)
    max_sequence_length: int = 16  # T5 tokens, for training and sampling alike
    clip_width: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    t5_width: int = 64  # also the transformer's context width (= 2 * clip_width for SD3)
    t5_layers: int = 2
    t5_heads: int = 4
    # transformer
    layers: int = 4  # SD3 joint blocks; FLUX double blocks
    single_layers: int = 4  # FLUX single blocks
    heads: int = 2
    head_dim: int = 64
    qk_norm: bool = True
    shift: float = 1.0  # scheduler shift (small images need none)

    def __post_init__(self):
        if self.variant not in ("sd3", "flux"):
            raise MMDiTError(f"toy variant must be 'sd3' or 'flux', got {self.variant!r}")
        if self.resolution % (self.vae_factor * 2):
            raise MMDiTError(f"toy resolution {self.resolution} must be a multiple of 2 * vae_factor "
                             f"({2 * self.vae_factor}) so latents patchify")
        if self.variant == "sd3" and 2 * self.clip_width > self.t5_width:
            raise MMDiTError(f"SD3 pads the two CLIP widths ({2 * self.clip_width}) to the T5 width "
                             f"({self.t5_width}); it must not be smaller")

    @property
    def pixel_vae(self) -> PixelSpaceConfig:
        return PixelSpaceConfig(factor=self.vae_factor)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor

    def clip_config(self, act: str) -> CLIPTextConfig:
        vocab, _ = tokenizers.clip_vocab(dataset.vocabulary())
        return CLIPTextConfig(vocab_size=len(vocab), width=self.clip_width, layers=self.clip_layers,
                              heads=self.clip_heads, ffn=4 * self.clip_width, max_positions=self.clip_length,
                              act=act, projection_dim=self.clip_width if self.variant == "sd3" else None)

    def t5_config(self) -> T5Config:
        return T5Config(vocab_size=len(tokenizers.t5_pieces(dataset.vocabulary())), d_model=self.t5_width,
                        d_kv=self.t5_width // self.t5_heads, d_ff=2 * self.t5_width, layers=self.t5_layers,
                        heads=self.t5_heads)

    def transformer_config(self):
        lat = self.pixel_vae.latent_channels
        if self.variant == "sd3":
            grid = 2 * self.latent_size // 2  # position table for up to twice the default side
            return MMDiTConfig(num_layers=self.layers, num_heads=self.heads, head_dim=self.head_dim,
                               patch_size=2, in_channels=lat, out_channels=lat, context_dim=self.t5_width,
                               pooled_dim=2 * self.clip_width, pos_embed_max_size=grid,
                               sample_size=self.latent_size, qk_norm=self.qk_norm)
        d = self.head_dim
        return FluxConfig(in_channels=4 * lat, out_channels=4 * lat, num_heads=self.heads, head_dim=d,
                          depth=self.layers, depth_single=self.single_layers, context_dim=self.t5_width,
                          pooled_dim=self.clip_width, axes_dim=(d // 8, d * 7 // 16, d * 7 // 16),
                          guidance_embed=False)


def _init(module_cls, cfg, seed):
    module = module_cls(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    return jax.tree.map(np.asarray, nnx.state(module).to_pure_dict())


def _write_json(path, obj):
    write_json(path, obj, sort_keys=True)


def _write_clip(folder, cfg: CLIPTextConfig, seed: int, with_projection: bool):
    os.makedirs(folder)
    params = _init(CLIPText, cfg, seed)
    # CLIPTextModelWithProjection nests the tower under `text_model.`; CLIPTextModel does not
    prefix = "text_model." if with_projection else ""
    tensors = {(k if k.startswith("text_projection") else prefix + k): v
               for k, v in rules.export_params(text_weights.clip_plan(cfg), params, text_weights.LAYOUT)}
    save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    config = {"architectures": [arch], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.width, "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.layers,
              "num_attention_heads": cfg.heads, "max_position_embeddings": cfg.max_positions,
              "hidden_act": cfg.act, "layer_norm_eps": cfg.eps, "projection_dim": cfg.projection_dim or cfg.width,
              # eos_token_id 2 is transformers' "pool at the argmax id" rule (the released configs')
              "bos_token_id": cfg.vocab_size - 2, "eos_token_id": 2, "pad_token_id": 1,
              "dropout": 0.0, "attention_dropout": 0.0, "torch_dtype": "float32",
              "transformers_version": TRANSFORMERS_VERSION}
    _write_json(os.path.join(folder, "config.json"), config)


def _write_t5(folder, cfg: T5Config, seed: int):
    os.makedirs(folder)
    params = _init(T5Encoder, cfg, seed)
    tensors = dict(rules.export_params(text_weights.t5_plan(cfg), params, text_weights.LAYOUT))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]  # tied, as transformers saves it
    save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    config = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": cfg.vocab_size,
              "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.layers,
              "num_heads": cfg.heads, "relative_attention_num_buckets": cfg.num_buckets,
              "relative_attention_max_distance": cfg.max_distance, "feed_forward_proj": "gated-gelu",
              "dense_act_fn": "gelu_new", "is_gated_act": True, "layer_norm_epsilon": cfg.eps,
              "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
              "tie_word_embeddings": False, "is_encoder_decoder": False, "use_cache": False,
              "torch_dtype": "float32", "transformers_version": TRANSFORMERS_VERSION}
    _write_json(os.path.join(folder, "config.json"), config)


def write_transformer(folder, config, seed: int = 0, params=None):
    """A diffusers transformer component folder for `config` (random init unless `params` given)."""
    os.makedirs(folder, exist_ok=True)
    model = Transformer.init(config, seed) if params is None else Transformer(config, params)
    fam = model.family
    patch = getattr(config, "patch_size", None)
    tensors = {k: np.asarray(v) for k, v in
               rules.export_params(fam.plan(config), jax.device_get(model.params), "diffusers", patch)}
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    _write_json(os.path.join(folder, "config.json"),
                {**config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION})


def _model_index(cfg: ToyConfig) -> dict:
    t = lambda cls: ["transformers", cls]  # noqa: E731
    common = {"_diffusers_version": DIFFUSERS_VERSION,
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "vae": ["mmdit_jax", "PixelSpaceVAE"], "tokenizer": t("CLIPTokenizer")}
    fam = family_named(cfg.variant)
    common.update({"_class_name": fam.pipelines.text_to_image, "transformer": ["diffusers", fam.diffusers_class],
                   SAMPLING_DEFAULTS_KEY: {"sample_size": cfg.latent_size,
                                           "max_sequence_length": cfg.max_sequence_length}})
    if cfg.variant == "sd3":
        return {**common,
                "text_encoder": t("CLIPTextModelWithProjection"), "text_encoder_2": t("CLIPTextModelWithProjection"),
                "text_encoder_3": t("T5EncoderModel"), "tokenizer_2": t("CLIPTokenizer"),
                "tokenizer_3": t("T5TokenizerFast"), "image_encoder": [None, None],
                "feature_extractor": [None, None]}
    return {**common, "text_encoder": t("CLIPTextModel"), "text_encoder_2": t("T5EncoderModel"),
            "tokenizer_2": t("T5TokenizerFast"), "image_encoder": [None, None],
            "feature_extractor": [None, None]}


def toy_config(variant: str = "sd3", **overrides) -> ToyConfig:
    return ToyConfig(variant=variant, **overrides)


def write_toy_pipeline(folder, variant: str = "sd3", seed: int = 0, config: ToyConfig | None = None,
                       overwrite: bool = False) -> ToyConfig:
    """Write a fresh toy pipeline folder; returns its ToyConfig. `config` overrides `variant`."""
    cfg = config if config is not None else toy_config(variant)
    folder = paths.absolute(folder)
    if paths.exists(folder) and (not paths.isdir(folder) or paths.listdir(folder)) and not overwrite:
        raise MMDiTError(f"{folder}: already exists and is not empty (pass overwrite=True to replace it)")
    with atomic_folder(folder) as tmp:
        _write_all(tmp, cfg, seed)
    return cfg


def _write_all(root: str, cfg: ToyConfig, seed: int):
    words = dataset.vocabulary()
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    _write_json(p("model_index.json"), _model_index(cfg))
    os.makedirs(p("scheduler"))
    _write_json(p("scheduler", "scheduler_config.json"),
                {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                 "num_train_timesteps": 1000, "shift": cfg.shift, "use_dynamic_shifting": False})
    os.makedirs(p("vae"))
    _write_json(p("vae", "config.json"), cfg.pixel_vae.to_diffusers())
    tokenizers.write_clip_tokenizer(p("tokenizer"), words, cfg.clip_length)
    # distinct seeds per component: no two encoders share weights
    if cfg.variant == "sd3":
        tokenizers.write_clip_tokenizer(p("tokenizer_2"), words, cfg.clip_length, pad_token="!")
        tokenizers.write_t5_tokenizer(p("tokenizer_3"), words)
        _write_clip(p("text_encoder"), cfg.clip_config("quick_gelu"), seed + 1, True)
        _write_clip(p("text_encoder_2"), cfg.clip_config("gelu"), seed + 2, True)
        _write_t5(p("text_encoder_3"), cfg.t5_config(), seed + 3)
    else:
        tokenizers.write_t5_tokenizer(p("tokenizer_2"), words)
        _write_clip(p("text_encoder"), cfg.clip_config("quick_gelu"), seed + 1, False)
        _write_t5(p("text_encoder_2"), cfg.t5_config(), seed + 3)
    write_transformer(p("transformer"), cfg.transformer_config(), seed)
    _write_json(p("toy.json"), {**dataclasses.asdict(cfg), "seed": seed})


def read_toy_config(folder) -> ToyConfig:
    """The ToyConfig a toy pipeline folder was written with (its toy.json)."""
    path = os.path.join(paths.local(os.fspath(folder)), "toy.json")
    if not os.path.isfile(path):
        raise MMDiTError(f"{folder}: not a toy pipeline folder (no toy.json)")
    with open(path) as f:
        raw = json.load(f)
    raw.pop("seed", None)
    names = {f.name for f in dataclasses.fields(ToyConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise MMDiTError(f"{path}: unknown toy settings {unknown}")
    return ToyConfig(**raw)
