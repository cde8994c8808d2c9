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
}
PIPELINE_OF_FAMILY = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# where the text towers bundled in single files go (SAI SD3 files; ComfyUI all-in-one FLUX files)
BUNDLED_TEXT = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
}

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


def default_scheduler(config) -> dict:
    """The released scheduler config for a transformer config (FLUX: dev if it has guidance)."""
    if config.family == "flux":
        return dict(SCHEDULERS["flux-dev" if config.guidance_embed else "flux-schnell"])
    return dict(SCHEDULERS["sd3"])


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
