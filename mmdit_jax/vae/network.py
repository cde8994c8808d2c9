"""The KL autoencoder (LDM / diffusers AutoencoderKL) as Flax NNX modules, NHWC throughout.

Parameter paths follow diffusers' module names so the key plan stays readable; LDM names are mapped in
weights.py. Convolutions and matmuls compute in the parameters' dtype; GroupNorm statistics and the
attention softmax are float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.attention import attention
from mmdit_jax.layers import Linear, ones, param, zeros
from mmdit_jax.vae.config import VAEConfig

_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")  # no sharding rule: the VAE is replicated


class Conv(nnx.Module):
    """2-D convolution, kernel stored (kh, kw, in, out) i.e. HWIO; `padding` as lax expects it."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, stride: int = 1, padding=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        # torch's default kernel init (kaiming-uniform, a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(cin * k * k)
        init = nnx.initializers.uniform(2 * bound)
        self.kernel = param(lambda key, s, d: init(key, s, d) - bound, rngs.params(), (k, k, cin, cout),
                            param_dtype, _CONV_AXES)
        self.bias = param(zeros, rngs.params(), (cout,), param_dtype, _CONV_AXES[-1:])
        self.stride = stride
        self.padding = ((k // 2, k // 2),) * 2 if padding is None else padding

    def __call__(self, x):
        k = self.kernel[...]
        y = jax.lax.conv_general_dilated(x.astype(k.dtype), k, (self.stride,) * 2, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, channels of a group); statistics and affine in float32."""

    def __init__(self, groups: int, channels: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.groups, self.eps = groups, eps
        self.scale = param(ones, rngs.params(), (channels,), param_dtype, ("norm",))
        self.bias = param(zeros, rngs.params(), (channels,), param_dtype, ("norm",))

    def __call__(self, x):
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)  # biased, as torch
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm-SiLU-conv twice plus a residual (1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, cin, **kw)
        self.conv1 = Conv(cin, cout, **kw)
        self.norm2 = GroupNorm(groups, cout, **kw)
        self.conv2 = Conv(cout, cout, **kw)
        self.conv_shortcut = Conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class MidAttention(nnx.Module):
    """Single-head self-attention over all H*W positions with a residual."""

    def __init__(self, c: int, groups: int, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, c, **kw)
        lin = dict(axes=("embed", "embed_out"), **kw)
        self.to_q, self.to_k, self.to_v = Linear(c, c, **lin), Linear(c, c, **lin), Linear(c, c, **lin)
        self.to_out = Linear(c, c, **lin)

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, 1, c)
        # head dim = C (512 in the released VAEs) is beyond fused GPU kernels: always plain XLA
        o = attention(self.to_q(t), self.to_k(t), self.to_v(t), backend="xla")
        return x + self.to_out(o.reshape(b, h, w, c))


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, add_attention: bool, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(c, c, groups, **kw) for _ in range(2)])
        self.attention = MidAttention(c, groups, **kw) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (the LDM convention, not symmetric)."""

    def __init__(self, c: int, *, param_dtype, rngs: nnx.Rngs):
        self.conv = Conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int, *, param_dtype, rngs: nnx.Rngs):
        self.conv = Conv(c, c, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution of the encoder or decoder: resnets, then an optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample, *, param_dtype, rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw) for i in range(n)])
        self.resample = resample(cout, **kw) if resample is not None else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.resample(x) if self.resample is not None else x


class Encoder(nnx.Module):
    """images (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent) = [mean, logvar]."""

    def __init__(self, cfg: VAEConfig, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv(cfg.in_channels, ch[0], **kw)
        self.down = nnx.List([
            Level(ch[max(i - 1, 0)], c, cfg.layers_per_block, g,
                  Downsample if i < len(ch) - 1 else None, **kw) for i, c in enumerate(ch)])
        self.mid = MidBlock(ch[-1], g, cfg.mid_block_add_attention, **kw)
        self.norm_out = GroupNorm(g, ch[-1], **kw)
        self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """latents (B, h, w, latent) -> images (B, h*f, w*f, out); levels run from the widest up."""

    def __init__(self, cfg: VAEConfig, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv(cfg.latent_channels, ch[0], **kw)
        self.mid = MidBlock(ch[0], g, cfg.mid_block_add_attention, **kw)
        self.up = nnx.List([
            Level(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g,
                  Upsample if i < len(ch) - 1 else None, **kw) for i, c in enumerate(ch)])
        self.norm_out = GroupNorm(g, ch[-1], **kw)
        self.conv_out = Conv(ch[-1], cfg.out_channels, **kw)

    def __call__(self, z):
        x = self.mid(self.conv_in(z))
        for level in self.up:
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Raw network: `encode_mean` returns the unscaled posterior mean, `decode` takes unscaled latents."""

    def __init__(self, cfg: VAEConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        m = cfg.latent_channels
        self.quant_conv = Conv(2 * m, 2 * m, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(m, m, 1, **kw) if cfg.use_post_quant_conv else None

    def encode_moments(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode_mean(self, x):
        # the posterior's mean: sampling is never wanted for latents fed to the transformer
        return self.encode_moments(x)[..., :self.config.latent_channels]

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
