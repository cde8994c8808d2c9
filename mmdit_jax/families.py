"""The transformer families (SD3, FLUX.1, FLUX.2): everything that differs per family, in one `Family` per family
package, and the one table of them (`families`). Code outside a family package asks the `Family`
(`family_of_config(cfg).sampling.guidance_scale`), it never compares family names.

Adding a family is a new package (its config, model, key plan and a `family.py` defining its `Family`)
plus its line in `families()` below."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Mapping

from mmdit_jax.errors import MMDiTError

# Prefixes single-file checkpoints put before the network's keys (SAI, ComfyUI).
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


@dataclasses.dataclass(frozen=True)
class Pipelines:
    """The family's diffusers pipeline classes (model_index.json `_class_name`)."""
    text_to_image: str
    img2img: str | None
    controlnet: str | None = None
    # the text-to-image pipeline of models with a guidance embedder where it is another class
    # (FLUX.2: dev's Flux2Pipeline beside klein's Flux2KleinPipeline)
    guided: str | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.text_to_image, self.guided, self.img2img, self.controlnet)
                     if n is not None)

    def for_config(self, config) -> str:
        """The text-to-image pipeline a transformer config ships in."""
        if self.guided is not None and getattr(config, "guidance_embed", False):
            return self.guided
        return self.text_to_image


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """How the family's diffusers pipeline samples, where it differs between families."""
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int  # text tokens of the long (T5) encoder
    sample_size: int | None  # latent pixels per side; None: the transformer config's `sample_size`
    # the pipeline always passes sigmas linspace(1, 1/N, N) and a resolution-dependent mu (FluxPipeline)
    linspace_sigmas_with_mu: bool
    # the transformer is fed float32(sigma * 1000) / 1000 (FluxPipeline's timestep / 1000), else sigma
    sigma_through_timesteps: bool
    # without a guidance embedder, guidance_scale is the CFG scale (SD3); else it feeds the embedder and
    # CFG is true_cfg_scale against a negative prompt
    guidance_scale_is_cfg: bool
    skip_layer_guidance: bool  # diffusers' skip-layer guidance exists for this family


@dataclasses.dataclass(frozen=True)
class VAEKind:
    """The family's autoencoder: its diffusers class and the released latent normalisation
    (latent = (posterior mean - shift) * scale)."""
    cls: str
    scale: float
    shift: float
    # key prefixes of a VAE inside this family's single files; the family with "*" takes any other
    single_file_prefixes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """The family's text-encoder set: the class that tokenizes and combines them (`from_pipeline`,
    `context_length`, `layout`), and where the towers bundled in single files go in a pipeline folder."""
    encoders: type
    bundled_folders: Mapping[str, str]  # bundle name (weights.BUNDLES) -> text_encoder* folder
    # its bundled CLIP-L files keep no projection; diffusers gives them an identity one (SD3)
    identity_projection: bool


@dataclasses.dataclass(frozen=True)
class OriginalFiles:
    """The reference repos' single-file layout (export to="original")."""
    transformer_file: str
    transformer_prefix: str
    vae_file: str  # the VAE written without a transformer beside it
    # not None: the VAE joins the transformer's file under this prefix (SAI SD3); None: ae.safetensors-
    # style file of its own (BFL)
    vae_prefix_in_transformer_file: str | None


@dataclasses.dataclass(frozen=True)
class ControlNetKind:
    """The family's ControlNets (mmdit_jax/controlnet.py runs them)."""
    family: str  # the base family its nets steer
    diffusers_class: str  # config.json `_class_name`
    config_class: type
    config_from_weights: Callable  # (shapes, layout, origin) -> config (a single file carries none)
    build: Callable  # (config, *, param_dtype, rngs) -> nnx.Module
    plan: Callable  # config -> list[rules.Entry]
    detect_layout: Callable  # keys -> "diffusers" | "original" | None
    # (net module, base module or None, latents, sigma, context, pooled, control, scale, guidance,
    #  control_mode, remat) -> the base model's residual keyword arguments
    residuals: Callable


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    diffusers_class: str  # the transformer's config.json `_class_name`
    presets: Mapping[str, object]
    config_from_diffusers: Callable  # (config dict, origin) -> config
    config_from_weights: Callable  # (shapes dict, layout, origin) -> config
    build: Callable  # (config, *, param_dtype, rngs) -> nnx.Module
    plan: Callable  # config -> list[rules.Entry]
    detect_layout: Callable  # keys -> "diffusers" | "original" | None
    latent_patch: Callable  # config -> latent pixels per token side
    pipelines: Pipelines
    sampling: SamplingDefaults | None  # None: mj.Pipeline does not sample this family (yet)
    # released scheduler_config.json by model name, and which one a transformer config gets
    schedulers: Mapping[str, Mapping]
    scheduler_of: Callable  # config -> a key of `schedulers`
    guidance_embedder: str  # the guidance embedder's parameter name (guidance-distilled models)
    vae: VAEKind
    text: TextEncoders
    original: OriginalFiles
    # (component name, to) -> a note on exports of guidance-distilled models the reference code cannot
    # read; None: it can
    distilled_export_note: Callable | None = None
    controlnet: ControlNetKind | None = None  # None: the family has no ControlNets


@functools.cache
def families() -> dict[str, Family]:
    """Every family by name. A new family is one line here (imported lazily: family packages import
    this module for `Family`)."""
    from mmdit_jax.flux.family import FLUX
    from mmdit_jax.flux2.family import FLUX2
    from mmdit_jax.sd3.family import SD3

    return {f.name: f for f in (SD3, FLUX, FLUX2)}


def family_named(name) -> Family:
    fams = families()
    if name not in fams:
        raise MMDiTError(f"unknown model family {name!r}; known: {sorted(fams)}")
    return fams[name]


def family_of_config(config) -> Family:
    return family_named(getattr(config, "family", None))


def family_of_pipeline(cls: str, origin: str) -> Family:
    """The family whose diffusers pipelines include `cls` (model_index.json `_class_name`), or, for a
    variant class (StableDiffusion3InpaintPipeline, Flux2KleinKVPipeline), the family with the longest
    pipeline-name stem it starts with."""
    stems = [(len(stem), fam) for fam in families().values() for name in fam.pipelines.names()
             for stem in [name.removesuffix("Pipeline")] if cls == name or cls.startswith(stem)]
    if stems:
        return max(stems, key=lambda s: s[0])[1]
    known = [n for f in families().values() for n in f.pipelines.names()]
    raise MMDiTError(f"{origin}: unsupported pipeline class {cls!r} (expected one of {', '.join(known)})")


def family_of_vae_prefix(prefix: str) -> Family:
    """The family whose single files hold their VAE under `prefix`."""
    fams = list(families().values())
    for fam in fams:
        if prefix in fam.vae.single_file_prefixes:
            return fam
    return next(f for f in fams if "*" in f.vae.single_file_prefixes)


class ByFamily(Mapping):
    """A read-only view {family name: one fact of that family}, for tables and tests."""

    def __init__(self, fact: Callable[[Family], object]):
        self._fact = fact

    def __getitem__(self, name):
        if name not in families():
            raise KeyError(name)
        return self._fact(families()[name])

    def __iter__(self) -> Iterator[str]:
        return iter(families())

    def __len__(self) -> int:
        return len(families())


def preset(name: str):
    """A released model's configuration by preset name (e.g. "sd3.5-medium", "flux-dev")."""
    for fam in families().values():
        if name in fam.presets:
            return fam.presets[name]
    known = sorted(p for f in families().values() for p in f.presets)
    raise MMDiTError(f"unknown preset {name!r}; known presets: {', '.join(known)}")


def family_of_diffusers_config(config: dict, origin: str) -> Family:
    """The family whose diffusers class a config.json names."""
    fams = families()
    cls = config.get("_class_name")
    match = [f for f in fams.values() if f.diffusers_class == cls]
    if not match:
        raise MMDiTError(f"{origin}: unknown model class {cls!r} in config.json; supported: "
                         f"{', '.join(f.diffusers_class for f in fams.values())}")
    return match[0]


def detect(tensors: Mapping, config: dict | None, origin: str):
    """(family, layout, tensor view with any single-file prefix removed)."""
    from mmdit_jax.io.sources import PrefixView

    fams = families()
    if config is not None:
        fam = family_of_diffusers_config(config, origin)
        layout = fam.detect_layout(list(tensors))
        if layout != "diffusers":
            raise MMDiTError(f"{origin}: weights are not in the diffusers {fam.diffusers_class} key layout")
        return fam, layout, tensors
    keys = list(tensors)
    for prefix in SINGLE_FILE_PREFIXES:
        view = PrefixView(tensors, prefix) if prefix else tensors
        vkeys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if not vkeys:
            continue
        for fam in fams.values():
            layout = fam.detect_layout(vkeys)
            if layout is not None:
                return fam, layout, view
    raise MMDiTError(f"{origin}: cannot tell the model family from its keys (not an SD3 or FLUX "
                     f"transformer in diffusers, SAI/BFL or ComfyUI layout); first keys: "
                     f"{', '.join(keys[:5])}")
