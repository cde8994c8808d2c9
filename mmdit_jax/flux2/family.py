"""FLUX.2 (dev, klein) as a `Family`: everything the rest of the package asks about this family."""
from mmdit_jax.families import Family, OriginalFiles, Pipelines, TextEncoders, VAEKind
from mmdit_jax.flux2 import weights
from mmdit_jax.flux2.config import PRESETS, Flux2Config
from mmdit_jax.flux2.model import Flux2
from mmdit_jax.flux2.text import Flux2TextEncoders

# Both FLUX.2 pipelines pass their own mu (compute_empirical_mu) with linspace sigmas to a dynamically
# shifting FlowMatchEulerDiscreteScheduler, so of this config only use_dynamic_shifting enters the schedule.
SCHEDULERS = {
    "flux2": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
              "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096},
}

FLUX2 = Family(
    name="flux2",
    diffusers_class="Flux2Transformer2DModel",
    presets=PRESETS,
    config_from_diffusers=Flux2Config.from_diffusers,
    config_from_weights=Flux2Config.from_weights,
    build=Flux2,
    plan=weights.plan,
    detect_layout=weights.detect_layout,
    latent_patch=lambda config: 1,  # tokens are the VAE's already patchified (2x2, 128-channel) latents
    # klein (no guidance embedder) and dev (guidance embedder) ship in different pipeline classes;
    # reference images replace img2img
    pipelines=Pipelines(text_to_image="Flux2KleinPipeline", img2img=None, guided="Flux2Pipeline"),
    sampling=None,  # mj.Pipeline does not sample FLUX.2 yet
    schedulers=SCHEDULERS,
    scheduler_of=lambda config: "flux2",
    guidance_embedder="guidance_in",
    # latents are normalised by the VAE's own batch-norm statistics, not a scale and shift; its single
    # files are told apart by their keys (vae/flux2_loader.py), not by a prefix
    vae=VAEKind(cls="AutoencoderKLFlux2", scale=1.0, shift=0.0, single_file_prefixes=()),
    text=TextEncoders(encoders=Flux2TextEncoders, bundled_folders={}, identity_projection=False),
    original=OriginalFiles(transformer_file="flux2.safetensors", transformer_prefix="",
                           vae_file="ae.safetensors", vae_prefix_in_transformer_file=None),
)
