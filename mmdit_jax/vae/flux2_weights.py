"""FLUX.2 VAE checkpoint layouts <-> the internal parameter tree, and detection from the weights.

Layouts: "diffusers" (AutoencoderKLFlux2's state dict) and "original", BFL's flux2 `ae.safetensors`:
the LDM names of the KL VAE (weights.py) with the quant convs inside the encoder and decoder
(`encoder.quant_conv`, `decoder.post_quant_conv`). Both keep the statistics as `bn.running_mean` and
`bn.running_var` (and a `bn.num_batches_tracked` counter, not used). diffusers' single-file loader has
no FLUX.2 VAE converter; the BFL names come from BFL's flux2 `autoencoder.py`.

A FLUX.2 VAE is told from the SD3 / FLUX.1 one by its batch-norm statistics, which no other KL VAE has.
"""
from __future__ import annotations

from typing import Mapping

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.rules import Entry, rule, tree_path
from mmdit_jax.io.sources import PrefixView
from mmdit_jax.vae import weights
from mmdit_jax.vae.flux2_config import Flux2VAEConfig

BN_KEYS = ("bn.running_mean", "bn.running_var")
BN_COUNTER = "bn.num_batches_tracked"  # training bookkeeping of torch's BatchNorm2d; no effect in eval



def _shape(tensors, k) -> tuple:
    return tuple(tensors.shape(k)) if hasattr(tensors, "shape") else tuple(tensors[k].shape)


def _conv(path, d, o):
    return [rule(f"{path}.kernel", d + ".weight", o + ".weight", "conv"),
            rule(f"{path}.bias", d + ".bias", o + ".bias", "vector")]


def rules_for(cfg: Flux2VAEConfig):
    # the KL network's own rules, the encoder's from the encoder widths, the decoder's from the decoder's
    r = [x for x in weights.rules_for(cfg.encoder_config) if x.path.startswith("encoder.")]
    r += [x for x in weights.rules_for(cfg.decoder_config) if x.path.startswith("decoder.")]
    if cfg.use_quant_conv:
        r += _conv("quant_conv", "quant_conv", "encoder.quant_conv")
    if cfg.use_post_quant_conv:
        r += _conv("post_quant_conv", "post_quant_conv", "decoder.post_quant_conv")
    r += [rule(k, k, k, "vector") for k in BN_KEYS]
    return r


def plan(cfg: Flux2VAEConfig) -> list[Entry]:
    """Every internal parameter of `AutoencoderKLFlux2(cfg)` with its diffusers and BFL keys."""
    return [Entry(tree_path(r.path), r) for r in rules_for(cfg)]


class VAETensors(PrefixView):
    """The VAE's tensors under `prefix`, without the batch norm's step counter (nothing reads it)."""

    def __init__(self, base: Mapping, prefix: str = ""):
        super().__init__(base, prefix)
        self._keys = [k for k in self._keys if k != BN_COUNTER]


def find_prefix(tensors: Mapping) -> str | None:
    """The key prefix of a FLUX.2 VAE inside a single file, None when the file holds none."""
    for prefix in weights.SINGLE_FILE_PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in tensors and all(prefix + k in tensors for k in BN_KEYS):
            return prefix
    return None


def layout_of(tensors: Mapping) -> str:
    diffusers = any(k.startswith("encoder.down_blocks.") for k in tensors)
    return "diffusers" if diffusers else "original"


def _decoder_widths(tensors: Mapping, layout: str, levels: int) -> tuple[int, ...]:
    """The decoder's widths in encoder order (diffusers' decoder_block_out_channels). diffusers numbers
    decoder levels in execution order (widest first), the LDM layout by resolution like the encoder."""
    if layout == "diffusers":
        key = "decoder.up_blocks.{}.resnets.0.conv1.weight"
        return tuple(_shape(tensors, key.format(levels - 1 - i))[0] for i in range(levels))
    return tuple(_shape(tensors, f"decoder.up.{i}.block.0.conv1.weight")[0] for i in range(levels))


def config_from_weights(tensors: Mapping, layout: str, origin: str, norm_num_groups: int = 32) -> Flux2VAEConfig:
    """The network's shape from tensor shapes. GroupNorm's group count leaves no trace: it is
    `norm_num_groups` (32 in BFL's code and every released file); the batch-norm eps is BFL's 1e-4."""
    kl = weights.config_from_weights(tensors, layout, origin, norm_num_groups)
    quant = ("quant_conv", "post_quant_conv") if layout == "diffusers" else \
        ("encoder.quant_conv", "decoder.post_quant_conv")
    stats = _shape(tensors, BN_KEYS[0])
    per_patch, rem = divmod(stats[0], kl.latent_channels) if len(stats) == 1 else (0, 1)
    side = int(round(per_patch ** 0.5))
    if rem or side * side != per_patch:
        raise MMDiTError(f"{origin}: {BN_KEYS[0]} has shape {stats}, not a square patch of the "
                         f"{kl.latent_channels} latent channels")
    try:
        decoder = _decoder_widths(tensors, layout, len(kl.block_out_channels))
    except KeyError as e:
        raise MMDiTError(f"{origin}: cannot detect the VAE's decoder, key {e} is missing") from None
    return Flux2VAEConfig(block_out_channels=kl.block_out_channels, decoder_block_out_channels=decoder,
                          layers_per_block=kl.layers_per_block,
                          in_channels=kl.in_channels, out_channels=kl.out_channels,
                          latent_channels=kl.latent_channels, norm_num_groups=kl.norm_num_groups,
                          mid_block_add_attention=kl.mid_block_add_attention,
                          use_quant_conv=f"{quant[0]}.weight" in tensors,
                          use_post_quant_conv=f"{quant[1]}.weight" in tensors,
                          patch_size=(side, side))
