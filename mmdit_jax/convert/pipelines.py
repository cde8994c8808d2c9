"""What a diffusers pipeline folder of each family holds: its class, components and the scheduler
config of the released models (for single-file sources, which carry none)."""
from __future__ import annotations

from mmdit_jax.errors import MMDiTError

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
PIPELINE_OF_FAMILY = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux2": "Flux2KleinPipeline"}
# families whose guidance-embedded models ship in a pipeline of their own
GUIDED_PIPELINE_OF_FAMILY = {"flux2": "Flux2Pipeline"}
# where the text towers bundled in single files go (SAI SD3 files; ComfyUI all-in-one FLUX files)
BUNDLED_TEXT = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "flux2": {},
}


def pipeline_of(config) -> str:
    """The diffusers pipeline class of a transformer config (FLUX.2: dev if it has guidance, else klein)."""
    if getattr(config, "guidance_embed", False) and config.family in GUIDED_PIPELINE_OF_FAMILY:
        return GUIDED_PIPELINE_OF_FAMILY[config.family]
    return PIPELINE_OF_FAMILY[config.family]

_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
# The hub repos' scheduler/scheduler_config.json: SD3 / SD3.5 shift 3.0; FLUX.1-dev resolution-dependent
# shift (mu linear in the image token count between 256 and 4096); FLUX.1-schnell no shift.
SCHEDULERS = {
    "sd3": {**_FLOW, "shift": 3.0},
    "flux-dev": {**_FLOW, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "flux-schnell": {**_FLOW, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}
# FLUX.2's pipelines pass their own mu (compute_empirical_mu) to a dynamically shifting scheduler, so of
# this config only use_dynamic_shifting matters; the rest is FLUX.1-dev's
SCHEDULERS["flux2"] = dict(SCHEDULERS["flux-dev"])


def default_scheduler(config) -> dict:
    """The released scheduler config for a transformer config (FLUX: dev if it has guidance)."""
    if config.family == "flux":
        return dict(SCHEDULERS["flux-dev" if config.guidance_embed else "flux-schnell"])
    return dict(SCHEDULERS[config.family])


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
