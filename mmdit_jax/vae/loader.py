"""The public VAE object and `load_vae`.

`vae.encode(images)` -> latents = (posterior mean - shift) * scale; `vae.decode(latents)` -> images
(decoder(z / scale + shift), in [-1, 1] up to the network's overshoot, not clipped). Images are
(B, H, W, C) NHWC with H, W multiples of the downsample factor (8 for released VAEs). Outputs are
float32 whatever the parameter dtype.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_of_vae_prefix
from mmdit_jax.io import paths
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.sources import PrefixView, open_component, read_json
from mmdit_jax.vae import tiling, weights
from mmdit_jax.vae.config import VAEConfig
from mmdit_jax.vae.network import AutoencoderKL
from mmdit_jax.vae.pixel import CLASS_NAME as PIXEL_CLASS
from mmdit_jax.vae.pixel import PixelSpaceConfig, PixelSpaceVAE
from mmdit_jax.vae.shapes import check_nhwc
from mmdit_jax.structure import Structure
from mmdit_jax.dtypes import parse_dtype


def _build(cfg, dtype, seed=0):
    return AutoencoderKL(cfg, param_dtype=dtype, rngs=nnx.Rngs(seed))


class _Network:
    """Structure and compiled functions of one (config, dtype); shared by every VAE with that pair, so
    loading the same network again (another file, another copy) reuses the compiled code."""

    def __init__(self, config: VAEConfig, dtype):
        self.config, self.dtype = config, dtype
        self.structure = Structure(nnx.eval_shape(lambda: _build(config, dtype)))
        self.encode = jax.jit(self.encode_apply)
        self.decode = jax.jit(self.decode_apply)
        # unscaled networks for tiles: scale/shift are applied once to the whole array instead
        self.mean_tile = jax.jit(self.raw_mean)
        self.decode_tile = jax.jit(self.raw_decode)

    def module(self, params) -> AutoencoderKL:
        return self.structure.module(params)

    def raw_mean(self, params, images):
        return self.module(params).encode_mean(images.astype(self.dtype)).astype(jnp.float32)

    def raw_decode(self, params, z):
        return self.module(params).decode(z.astype(self.dtype)).astype(jnp.float32)

    def encode_apply(self, params, images):
        return (self.raw_mean(params, images) - self.config.shift_factor) * self.config.scaling_factor

    def decode_apply(self, params, latents):
        z = latents.astype(jnp.float32) / self.config.scaling_factor + self.config.shift_factor
        return self.raw_decode(params, z)


@functools.lru_cache(maxsize=8)
def _network(config: VAEConfig, dtype) -> _Network:
    return _Network(config, dtype)


class VAE:
    """Config + params; `encode_apply(params, x)` / `decode_apply(params, z)` are pure, `encode` / `decode`
    run them jitted with `self.params` (compiled once per input shape).

    Another autoencoder (FLUX.2's) subclasses it, naming its network, latent width and latent map."""

    _network_of = staticmethod(lambda config, dtype: _network(config, dtype))
    _build_of = staticmethod(lambda config, dtype, seed: _build(config, dtype, seed))

    def __init__(self, config: VAEConfig, params, dtype=jnp.float32):
        self.config = config
        self.dtype = parse_dtype(dtype)
        self.params = params
        self._net = self._network_of(config, self.dtype)
        self.encode_apply, self.decode_apply = self._net.encode_apply, self._net.decode_apply
        self._encode, self._decode = self._net.encode, self._net.decode
        self._mean_tile, self._decode_tile = self._net.mean_tile, self._net.decode_tile

    @classmethod
    def init(cls, config: VAEConfig, seed: int = 0, dtype="float32") -> "VAE":
        """Random weights (torch's default bound for conv kernels, xavier linears, zero biases)."""
        dtype = parse_dtype(dtype)
        module = nnx.jit(lambda: cls._build_of(config, dtype, seed))()
        return cls(config, nnx.state(module).to_pure_dict(), dtype)

    def module(self, params=None) -> AutoencoderKL:
        """The NNX module holding `params` (default: this VAE's)."""
        return self._net.module(self.params if params is None else params)

    # what differs between autoencoders -----------------------------------------------------------
    @property
    def _latent_channels(self) -> int:
        """Channels of the latents `encode` returns."""
        return self.config.latent_channels

    @property
    def _network_factor(self) -> int:
        """Pixels per latent pixel of the network itself (tiles are cut in its units)."""
        return self.config.downsample_factor

    def _to_latents(self, mean: np.ndarray):
        """The posterior mean of the whole image -> latents."""
        scale, shift = np.float32(self.config.scaling_factor), np.float32(self.config.shift_factor)
        return jnp.asarray((mean - shift) * scale)

    def _from_latents(self, latents) -> np.ndarray:
        """Latents -> what the decoder network takes, on the host."""
        return np.asarray(latents, np.float32) / np.float32(self.config.scaling_factor) \
            + np.float32(self.config.shift_factor)

    # jitted entry points ------------------------------------------------------------------------
    def encode(self, images):
        check_nhwc(images, self.config.in_channels, "images", self.config.downsample_factor)
        return self._encode(self.params, images)

    def decode(self, latents):
        check_nhwc(latents, self._latent_channels, "latents", 1)
        return self._decode(self.params, latents)

    def encode_tiled(self, images, tile_size: int = 512, overlap: float = 0.25):
        """Encode tile by tile (`tile_size` pixels, fraction `overlap` shared with the neighbours);
        images that fit in one tile are encoded whole, as diffusers does. The latent map applies once
        to the whole blended mean."""
        check_nhwc(images, self.config.in_channels, "images", self.config.downsample_factor)
        f = self._network_factor
        self._check_tile(tile_size, overlap, f, True)
        h, w = images.shape[1:3]
        if h <= tile_size and w <= tile_size:
            return self.encode(images)
        mean = tiling.run_tiled(lambda t: self._mean_tile(self.params, t), np.asarray(images), tile_size,
                                tile_size // f, overlap)
        return self._to_latents(mean)

    def decode_tiled(self, latents, tile_size: int = 512, overlap: float = 0.25):
        """Decode tile by tile; `tile_size` is in output pixels. Tiles are cut from what the decoder
        network takes (tile_size / 8 latent pixels a side for the released VAEs), as diffusers' tiled
        decode cuts the latents its pipelines hand to `vae.decode`."""
        check_nhwc(latents, self._latent_channels, "latents", 1)
        f = self._network_factor
        self._check_tile(tile_size, overlap, f, False)
        z = self._from_latents(latents)
        lt = tile_size // f
        if z.shape[1] <= lt and z.shape[2] <= lt:
            return self.decode(latents)
        return jnp.asarray(tiling.run_tiled(lambda t: self._decode_tile(self.params, t), z, lt, tile_size,
                                            overlap))

    @staticmethod
    def _check_tile(tile_size, overlap, f, encoding: bool):
        if tile_size <= 0 or tile_size % f:
            raise MMDiTError(f"tile_size {tile_size} must be a positive multiple of the network's "
                             f"downsample factor {f}")
        # encoding steps through pixels, so its stride must also land on latent pixel boundaries
        if encoding and int(tile_size * (1 - overlap)) % f:
            raise MMDiTError(f"tile_size {tile_size} with overlap {overlap} gives a stride of "
                             f"{int(tile_size * (1 - overlap))} pixels, not a multiple of {f}")
        tiling.tile_geometry(tile_size, tile_size // f, overlap)  # overlap range, tiles not too small


def pixel_space_config(path) -> PixelSpaceConfig | None:
    """The PixelSpaceVAE config when `path` (a pipeline folder or its vae/ folder) holds one."""
    path = paths.local(os.fspath(path))
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "model_index.json")):
        path = os.path.join(path, "vae")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    cfg = read_json(cfg_path)
    if cfg.get("_class_name") != PIXEL_CLASS:
        return None
    return PixelSpaceConfig.from_diffusers(cfg, cfg_path)


def vae_weights(path, dtype="float32", *, family: str | None = None,
                config: VAEConfig | None = None) -> ComponentWeights:
    """Config, abstract params and the source of a VAE (see `load_vae`; nothing read yet)."""
    from mmdit_jax.vae import flux2_loader  # it builds on this module

    if flux2_loader.wanted(path, family):
        return flux2_loader.flux2_vae_weights(path, dtype, family=family, config=config)
    dtype = parse_dtype(dtype)
    src = open_component(path, "vae")
    tensors, layout, origin = src.tensors, "diffusers", src.origin
    if src.config is not None:
        detected = VAEConfig.from_diffusers(src.config, origin)
    else:
        try:
            prefix, layout = weights.detect_single_file(tensors)
        except MMDiTError as e:
            raise MMDiTError(f"{origin}: {e}") from None
        tensors = PrefixView(tensors, prefix) if prefix else tensors
        detected = weights.config_from_weights(tensors, layout, origin)
        detected = detected.with_family(family or family_of_vae_prefix(prefix).name)
    cfg = config if config is not None else detected
    if family is not None and config is None:
        cfg = cfg.with_family(family)
    template = _network(cfg, dtype).structure.abstract_params()
    if src.orbax:
        return ComponentWeights(cfg, template, origin)
    return ComponentWeights(cfg, template, origin, weights.plan(cfg), tensors, layout)


def load_vae(path, dtype="float32", *, family: str | None = None, config: VAEConfig | None = None) -> VAE:
    """The 16-channel KL VAE from a diffusers pipeline folder (its vae/), an AutoencoderKL component
    folder, an Orbax folder written by mmdit-convert, or a single .safetensors file in the LDM layout
    (SD3 files, keys under `first_stage_model.`; BFL's `ae.safetensors`, bare keys) or the diffusers
    layout.

    Latent scale/shift: a folder's config.json gives them. A single file carries none, so they come
    from `family` (a family name) when given, else from where the keys sit (`Family.vae`):
    `first_stage_model.` (an SD3 checkpoint) means SD3, bare or `vae.` keys (BFL's ae.safetensors)
    FLUX. An explicit `family` also overrides a config.json's values. `config` replaces detection entirely (needed only
    for networks whose GroupNorm group count is not 32, which weights can not reveal).

    A folder whose config.json names `PixelSpaceVAE` gives that parameter-free latent map instead, and
    FLUX.2's VAE (AutoencoderKLFlux2, or `family="flux2"`) a `Flux2VAE` (flux2_loader.py)."""
    path = paths.local(os.fspath(path))
    pixel = pixel_space_config(path)
    if pixel is not None:  # parameter-free: no weights file to open
        return PixelSpaceVAE(pixel, {}, parse_dtype(dtype))
    from mmdit_jax.vae import flux2_loader  # it builds on this module

    if flux2_loader.wanted(path, family):
        return flux2_loader.load_flux2_vae(path, dtype, family=family, config=config)
    w = vae_weights(path, dtype, family=family, config=config)
    return VAE(w.config, w.params(), dtype)
