"""SD3 / SD3.5 as a `Family`: everything the rest of the package asks about this family."""
from mmdit_jax.families import Family, OriginalFiles, Pipelines, SamplingDefaults, TextEncoders, VAEKind
from mmdit_jax.sd3 import weights
from mmdit_jax.sd3.controlnet_family import SD3_CONTROLNET
from mmdit_jax.sd3.config import PRESETS, MMDiTConfig
from mmdit_jax.sd3.model import MMDiT
from mmdit_jax.sd3.text import SD3TextEncoders

# The hub repos' scheduler/scheduler_config.json (SD3 and SD3.5 alike).
SCHEDULERS = {"sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}}



def _distilled_export_note(component: str, to: str) -> str:
    where = "diffusers' SD3Transformer2DModel" if to == "diffusers" else "Stability AI's sd3 code"
    return (f"{component}: this guidance-distilled SD3-family model keeps its guidance embedder (g_embedder) "
            f"and config 'guidance_embeds'; {where} has no such layer and will drop or reject them, so only "
            f"mmdit-jax loads this export as distilled")


SD3 = Family(
    name="sd3",
    diffusers_class="SD3Transformer2DModel",
    presets=PRESETS,
    config_from_diffusers=MMDiTConfig.from_diffusers,
    config_from_weights=MMDiTConfig.from_weights,
    build=MMDiT,
    plan=weights.plan,
    detect_layout=weights.detect_layout,
    latent_patch=lambda config: config.patch_size,
    pipelines=Pipelines(text_to_image="StableDiffusion3Pipeline", img2img="StableDiffusion3Img2ImgPipeline",
                        controlnet="StableDiffusion3ControlNetPipeline"),
    # StableDiffusion3Pipeline's defaults; the image side is the transformer config's sample_size
    sampling=SamplingDefaults(num_inference_steps=28, guidance_scale=7.0, max_sequence_length=256,
                              sample_size=None, linspace_sigmas_with_mu=False, sigma_through_timesteps=False,
                              guidance_scale_is_cfg=True, skip_layer_guidance=True),
    schedulers=SCHEDULERS,
    scheduler_of=lambda config: "sd3",
    guidance_embedder="g_embedder",
    vae=VAEKind(cls="AutoencoderKL", scale=1.5305, shift=0.0609, single_file_prefixes=("first_stage_model.",)),
    text=TextEncoders(encoders=SD3TextEncoders,
                      bundled_folders={"clip_l": "text_encoder", "clip_g": "text_encoder_2",
                                       "t5xxl": "text_encoder_3"},
                      identity_projection=True),
    original=OriginalFiles(transformer_file="sd3.safetensors", transformer_prefix="model.diffusion_model.",
                           vae_file="vae.safetensors", vae_prefix_in_transformer_file="first_stage_model."),
    distilled_export_note=_distilled_export_note,
    controlnet=SD3_CONTROLNET,
)
