"""The public FLUX.2 VAE object and its loader.

`vae.encode(images)` -> the latents FLUX.2's transformer denoises: (B, H/16, W/16, 128), the posterior
mean patchified 2x2 and normalised with the batch-norm running statistics, exactly as diffusers'
Flux2Pipeline / Flux2KleinPipeline build them (flux2_network.py). `vae.decode(latents)` -> images in
[-1, 1] up to the network's overshoot, not clipped. Images are (B, H, W, C) NHWC with H and W multiples
of 16. Outputs are float32 whatever the parameter dtype.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.sources import open_component, open_tensors, read_json
from mmdit_jax.structure import Structure
from mmdit_jax.dtypes import parse_dtype
from mmdit_jax.vae import flux2_weights
from mmdit_jax.vae.flux2_config import CLASS_NAME, Flux2VAEConfig
from mmdit_jax.vae.flux2_network import AutoencoderKLFlux2
from mmdit_jax.vae.loader import VAE



def _family_wants_this(family: str | None) -> bool:
    """Whether the named family's VAE is this class (its `Family.vae.cls`)."""
    from mmdit_jax.families import family_named

    return family is not None and family_named(family).vae.cls == CLASS_NAME


def _build(cfg, dtype, seed=0):
    return AutoencoderKLFlux2(cfg, param_dtype=dtype, rngs=nnx.Rngs(seed))


class _Network:
    """Structure and compiled functions of one (config, dtype), shared by every VAE with that pair."""

    def __init__(self, config: Flux2VAEConfig, dtype):
        self.config, self.dtype = config, dtype
        self.structure = Structure(nnx.eval_shape(lambda: _build(config, dtype)))
        self.encode = jax.jit(self.encode_apply)
        self.decode = jax.jit(self.decode_apply)
        # tiles run the raw network; patchify and normalisation apply once to the whole array
        self.mean_tile = jax.jit(self.raw_mean)
        self.decode_tile = jax.jit(self.raw_decode)
        self.to_latents = jax.jit(lambda params, mean: self.module(params).to_latents(mean))
        self.from_latents = jax.jit(lambda params, z: self.module(params).from_latents(z))

    def module(self, params) -> AutoencoderKLFlux2:
        return self.structure.module(params)

    def raw_mean(self, params, images):
        return self.module(params).encode_mean_raw(images.astype(self.dtype)).astype(jnp.float32)

    def raw_decode(self, params, z):
        return self.module(params).decode_raw(z.astype(self.dtype)).astype(jnp.float32)

    def encode_apply(self, params, images):
        return self.module(params).to_latents(self.raw_mean(params, images))

    def decode_apply(self, params, latents):
        return self.raw_decode(params, self.module(params).from_latents(latents))


@functools.lru_cache(maxsize=8)
def _network(config: Flux2VAEConfig, dtype) -> _Network:
    return _Network(config, dtype)


class Flux2VAE(VAE):
    """The KL VAE's interface over AutoencoderKLFlux2: latents are the 128-channel patchified, normalised
    tokens; tiles are cut in the network's own units (8 pixels per latent pixel)."""

    _network_of = staticmethod(lambda config, dtype: _network(config, dtype))
    _build_of = staticmethod(lambda config, dtype, seed: _build(config, dtype, seed))

    def __init__(self, config: Flux2VAEConfig, params, dtype=jnp.float32):
        super().__init__(config, params, dtype)

    @classmethod
    def init(cls, config: Flux2VAEConfig, seed: int = 0, dtype="float32") -> "Flux2VAE":
        """Random weights (as the KL VAE's init) and identity statistics (mean 0, variance 1)."""
        return super().init(config, seed, dtype)

    @property
    def _latent_channels(self) -> int:
        return self.config.patched_channels

    @property
    def _network_factor(self) -> int:
        return self.config.network_factor

    def _to_latents(self, mean):
        return self._net.to_latents(self.params, jnp.asarray(mean))

    def _from_latents(self, latents):
        return np.asarray(self._net.from_latents(self.params, jnp.asarray(latents)))


def holds_flux2_vae(path) -> bool:
    """Whether `path` (pipeline folder, vae/ folder or single file) holds a FLUX.2 VAE: a config.json
    naming AutoencoderKLFlux2, or a file with the batch-norm statistics only FLUX.2's VAE has."""
    path = paths.local(os.fspath(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            path = os.path.join(path, "vae")
        cfg_path = os.path.join(path, "config.json")
        return os.path.isfile(cfg_path) and read_json(cfg_path).get("_class_name") == CLASS_NAME
    if os.path.isfile(path):
        return flux2_weights.find_prefix(open_tensors(path)) is not None
    return False


def wanted(path, family: str | None) -> bool:
    """Whether `load_vae(path, family=family)` is a request for this VAE (then it is the one loader)."""
    return _family_wants_this(family) or holds_flux2_vae(path)


def flux2_vae_weights(path, dtype="float32", *, family: str | None = None,
                      config: Flux2VAEConfig | None = None) -> ComponentWeights:
    """Config, abstract params and the source of a FLUX.2 VAE (see `load_flux2_vae`; nothing read)."""
    dtype = parse_dtype(dtype)
    src = open_component(path, "vae")
    origin = src.origin
    if family is not None and not _family_wants_this(family):
        raise MMDiTError(f"{origin}: holds a FLUX.2 VAE ({CLASS_NAME}); family {family!r} does not apply "
                         "(use the family whose VAE this is, or none)")
    if config is not None and not isinstance(config, Flux2VAEConfig):
        raise MMDiTError(f"{origin}: holds a FLUX.2 VAE; config must be a Flux2VAEConfig, got "
                         f"{type(config).__name__}")
    if src.config is not None:
        detected = Flux2VAEConfig.from_diffusers(src.config, os.path.join(origin, "config.json"))
        tensors, layout = flux2_weights.VAETensors(src.tensors), "diffusers"
    else:
        prefix = flux2_weights.find_prefix(src.tensors)
        if prefix is None:
            raise MMDiTError(f"{origin}: not a FLUX.2 VAE (no encoder.conv_in.weight with "
                             f"{' and '.join(flux2_weights.BN_KEYS)}); FLUX.1 and SD3 VAEs load with "
                             "family 'flux' or 'sd3'")
        tensors = flux2_weights.VAETensors(src.tensors, prefix)
        layout = flux2_weights.layout_of(tensors)
        # a given config stands for detection (the only way to a group count other than 32)
        detected = config or flux2_weights.config_from_weights(tensors, layout, origin)
    cfg = config if config is not None else detected
    template = _network(cfg, dtype).structure.abstract_params()  # statistics float32 in any dtype
    if src.orbax:
        return ComponentWeights(cfg, template, origin)
    return ComponentWeights(cfg, template, origin, flux2_weights.plan(cfg), tensors, layout)


def load_flux2_vae(path, dtype="float32", *, family: str | None = None,
                   config: Flux2VAEConfig | None = None) -> Flux2VAE:
    """FLUX.2's VAE from a diffusers pipeline folder (its vae/), an AutoencoderKLFlux2 component folder,
    or a single .safetensors file: BFL's `ae.safetensors` (bare keys, or under `vae.` /
    `first_stage_model.`) or a diffusers state dict. A FLUX.1 or SD3 VAE is refused."""
    w = flux2_vae_weights(path, dtype, family=family, config=config)
    return Flux2VAE(w.config, w.params(), dtype)
