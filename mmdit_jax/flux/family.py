"""FLUX.1 as a `Family`: everything the rest of the package asks about this family."""
from mmdit_jax.families import Family, OriginalFiles, Pipelines, SamplingDefaults, TextEncoders, VAEKind
from mmdit_jax.flux import weights
from mmdit_jax.flux.controlnet_family import FLUX_CONTROLNET
from mmdit_jax.flux.config import PRESETS, FluxConfig
from mmdit_jax.flux.model import Flux
from mmdit_jax.flux.text import FluxTextEncoders

_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
# The hub repos' scheduler/scheduler_config.json: FLUX.1-dev resolution-dependent shift (mu linear in the
# image token count between 256 and 4096); FLUX.1-schnell no shift.
SCHEDULERS = {
    "flux-dev": {**_FLOW, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "flux-schnell": {**_FLOW, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}

FLUX = Family(
    name="flux",
    diffusers_class="FluxTransformer2DModel",
    presets=PRESETS,
    config_from_diffusers=FluxConfig.from_diffusers,
    config_from_weights=FluxConfig.from_weights,
    build=Flux,
    plan=weights.plan,
    detect_layout=weights.detect_layout,
    latent_patch=lambda config: 2,  # FLUX packs 2x2 latent pixels into a token
    pipelines=Pipelines(text_to_image="FluxPipeline", img2img="FluxImg2ImgPipeline",
                        controlnet="FluxControlNetPipeline"),
    # FluxPipeline's defaults (default_sample_size 128 latent pixels)
    sampling=SamplingDefaults(num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512,
                              sample_size=128, linspace_sigmas_with_mu=True, sigma_through_timesteps=True,
                              guidance_scale_is_cfg=False, skip_layer_guidance=False),
    schedulers=SCHEDULERS,
    # the released scheduler of a model with a guidance embedder is dev's, else schnell's
    scheduler_of=lambda config: "flux-dev" if config.guidance_embed else "flux-schnell",
    guidance_embedder="guidance_in",
    vae=VAEKind(cls="AutoencoderKL", scale=0.3611, shift=0.1159, single_file_prefixes=("*",)),
    text=TextEncoders(encoders=FluxTextEncoders,
                      bundled_folders={"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
                      identity_projection=False),
    original=OriginalFiles(transformer_file="flux.safetensors", transformer_prefix="",
                           vae_file="ae.safetensors", vae_prefix_in_transformer_file=None),
    controlnet=FLUX_CONTROLNET,
)
