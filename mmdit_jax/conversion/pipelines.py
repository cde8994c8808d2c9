"""What a diffusers pipeline folder holds: its components by pipeline class, and the scheduler config of
the released models (for single-file sources, which carry none; each family's `schedulers`)."""
from __future__ import annotations

from collections.abc import Mapping

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import families, family_of_config

# component name -> (library, class) as model_index.json lists them, in diffusers' order
COMPONENTS = {
    "StableDiffusion3Pipeline": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "SD3Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    },
    "FluxPipeline": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    },
    # FLUX.2: dev (Mistral 3 text encoder, guidance embedder) and klein (Qwen3, base and distilled)
    "Flux2Pipeline": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Mistral3ForConditionalGeneration"),
        "tokenizer": ("transformers", "PixtralProcessor"),
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
    },
    "Flux2KleinPipeline": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen3ForCausalLM"),
        "tokenizer": ("transformers", "Qwen2TokenizerFast"),
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
    },
}


class _ReleasedSchedulers(Mapping):
    """Every family's released scheduler_config.json by model name (`Family.schedulers`)."""

    def _all(self) -> dict:
        return {k: v for fam in families().values() for k, v in fam.schedulers.items()}

    def __getitem__(self, name):
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())


SCHEDULERS = _ReleasedSchedulers()


def default_scheduler(config) -> dict:
    """The released scheduler config for a transformer config (FLUX: dev if it has guidance)."""
    fam = family_of_config(config)
    return dict(fam.schedulers[fam.scheduler_of(config)])


def model_index(pipeline: str, present: dict[str, str | None]) -> dict:
    """model_index.json: every component of `pipeline`, [null, null] for those absent (diffusers then
    passes None), and `present`'s own class names where they differ from the defaults."""
    if pipeline not in COMPONENTS:
        raise MMDiTError(f"unsupported pipeline class {pipeline!r}; supported: {', '.join(COMPONENTS)}")
    out = {"_class_name": pipeline}
    for name, (lib, cls) in COMPONENTS[pipeline].items():
        if name in present:
            out[name] = [lib, present[name] or cls]
        else:
            out[name] = [None, None]
    return out
