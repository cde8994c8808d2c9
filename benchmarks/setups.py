"""The benchmark configurations, built once in diffusers with random weights and read into this project
through the public loaders (save_pretrained to a temporary folder, then mj.load_*), so both sides run
identical weights. Each comparison also checks the outputs agree before it times anything.

Sizes are small enough for a 2-core CPU run (float32); GPU runs at the released sizes are not written yet."""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

import common  # noqa: F401  (puts this checkout first on sys.path)


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str  # "sd3", "flux" or "flux2"
    batch: int
    height: int  # latent pixels (NHWC); image tokens = height*width/4 (FLUX.2: already 2x2-patchified, h*w)
    width: int
    txt_tokens: int
    diffusers_kwargs: dict

    @property
    def img_tokens(self) -> int:
        if self.layout == "flux2":
            return self.height * self.width
        return (self.height // 2) * (self.width // 2)


CASES = {
    # width 512 (8 heads of 64), 6 joint blocks, 32x48 latent = 384 image tokens + 128 text, batch 2
    "sd3": Case("sd3", 2, 32, 48, 128, dict(
        sample_size=32, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
        num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=512,
        pooled_projection_dim=256, out_channels=16, pos_embed_max_size=48)),
    # width 512 (4 heads of 128), 2 double + 4 single blocks, same tokens, FLUX-dev style (guidance)
    "flux": Case("flux", 2, 32, 48, 128, dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
        num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    # FLUX.1-dev as released (random weights), one 1024x1024 image (128x128 latent), 512 T5 tokens: the
    # GPU case (--dtype bfloat16 --torch_device cuda); about 24 GB of weights on each side
    "flux-dev-1024": Case("flux", 1, 128, 128, 512, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}


def _flux2(heads: int, height: int, width: int, txt_tokens: int, double: int, single: int) -> Case:
    """FLUX.2-dev style (guidance embedder, SwiGLU ratio 3, 4-axis RoPE) with `heads` heads of 128 over
    an h x w grid of 128-channel tokens; batch 2."""
    return Case("flux2", 2, height, width, txt_tokens, dict(
        patch_size=1, in_channels=128, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=heads, joint_attention_dim=128 * heads, guidance_embeds=True,
        axes_dims_rope=(32, 32, 32, 32)))


# the FLUX.1 cases' widths and token counts: 512 over 384 image + 128 text tokens (2 double + 4 single
# blocks); 256 over 192 + 64; tiny: 128 over 64 + 32 (heads of 128 as released, so fewer heads)
CASES["flux2"] = _flux2(4, 16, 24, 128, 2, 4)
CASES["flux2-mid"] = _flux2(2, 12, 16, 64, 2, 4)
CASES["flux2-tiny"] = _flux2(1, 8, 8, 32, 2, 2)


def _smaller(case: Case, heads: int, height: int, width: int, txt_tokens: int, **overrides) -> Case:
    """The same layout with `heads` heads of 64 (text and pooled widths scaled alike) over a smaller
    latent and text: per-operation overhead weighs more the smaller the model, which is the regime of
    small models and of sampling small images, where eager dispatch costs most."""
    d = 64 * heads
    kw = {**case.diffusers_kwargs, "attention_head_dim": 64, "num_attention_heads": heads,
          "joint_attention_dim": d, "pooled_projection_dim": d // 2, **overrides}
    return dataclasses.replace(case, height=height, width=width, txt_tokens=txt_tokens, diffusers_kwargs=kw)


# tiny: width 128 over 64 image + 32 text tokens (overhead-bound); mid: width 256 over 192 + 64 tokens
CASES["sd3-tiny"] = _smaller(CASES["sd3"], 2, 16, 16, 32, num_layers=4, caption_projection_dim=128,
                             sample_size=16, pos_embed_max_size=16)
CASES["flux-tiny"] = _smaller(CASES["flux"], 2, 16, 16, 32, num_layers=2, num_single_layers=2,
                              axes_dims_rope=(8, 28, 28))
CASES["sd3-mid"] = _smaller(CASES["sd3"], 4, 24, 32, 64, caption_projection_dim=256, sample_size=32,
                            pos_embed_max_size=32)
CASES["flux-mid"] = _smaller(CASES["flux"], 4, 24, 32, 64, axes_dims_rope=(8, 28, 28))


def torch_transformer(case: Case, seed: int = 0, std: float = 0.02, device="cpu", dtype=None):
    """The diffusers transformer with N(0, std^2) weights everywhere (no zero-initialised layer).

    On CPU it is built and drawn in float32 (then cast to `dtype`); on an accelerator it is built and
    drawn there in `dtype`, since a released size in float32 would not fit beside its bf16 copy."""
    import torch
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel

    cls = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel,
           "flux2": Flux2Transformer2DModel}[case.layout]
    torch.manual_seed(seed)
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    build_dtype = torch.float32 if on_cpu or dtype is None else dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(build_dtype)
    try:
        with device:
            model = cls(**case.diffusers_kwargs).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * std)
    return model if dtype is None else model.to(dtype)


def load_ours(torch_model, loader):
    """Saves a diffusers model/pipeline and reads it back with one of mj's loaders."""
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder)
        return loader(folder)


def inputs(case: Case, seed: int = 0) -> dict:
    """NHWC latents, sigma, context, pooled (none for FLUX.2) and guidance (FLUX), float32 numpy."""
    rng = np.random.default_rng(seed)
    kw = case.diffusers_kwargs
    channels = kw["in_channels"] if case.layout == "flux2" else 16
    out = dict(latents=rng.standard_normal((case.batch, case.height, case.width, channels), dtype=np.float32),
               sigma=np.linspace(0.9, 0.3, case.batch).astype(np.float32),
               context=rng.standard_normal((case.batch, case.txt_tokens, kw["joint_attention_dim"]),
                                           dtype=np.float32))
    if case.layout != "flux2":
        out["pooled"] = rng.standard_normal((case.batch, kw["pooled_projection_dim"]), dtype=np.float32)
    if case.layout in ("flux", "flux2"):
        out["guidance"] = np.full((case.batch,), 3.5, np.float32)
    return out


def flux_ids(case: Case):
    import torch

    h, w = case.height // 2, case.width // 2
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.stack([np.zeros_like(rows), rows, cols], -1).reshape(h * w, 3)
    return torch.tensor(img, dtype=torch.float32), torch.zeros(case.txt_tokens, 3)


def pack(lat):
    """NHWC latents (numpy or torch) -> diffusers' FLUX tokens (B, h*w, C*4), channels (c, ph, pw)."""
    b, hh, ww, c = lat.shape
    x = lat.reshape(b, hh // 2, 2, ww // 2, 2, c)
    x = x.permute(0, 1, 3, 5, 2, 4) if hasattr(x, "permute") else x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(tokens, hh: int, ww: int):
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, hh // 2, ww // 2, c, 2, 2)
    x = x.permute(0, 1, 4, 2, 5, 3) if hasattr(x, "permute") else x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, hh, ww, c)


def torch_velocity_fn(case: Case, model):
    """f(latents NHWC torch, sigma (B,) torch, context, pooled, guidance) -> velocity NHWC, calling
    diffusers' transformer the way its pipeline does (timestep 1000*sigma for SD3, sigma for FLUX)."""
    if case.layout == "sd3":
        def f(lat, sigma, ctx, pooled, guidance=None):
            out = model(hidden_states=lat.permute(0, 3, 1, 2), encoder_hidden_states=ctx,
                        pooled_projections=pooled, timestep=sigma * 1000, return_dict=False)[0]
            return out.permute(0, 2, 3, 1)
        return f
    if case.layout == "flux2":
        return _flux2_velocity_fn(case, model)
    img_ids, txt_ids = flux_ids(case)

    def f(lat, sigma, ctx, pooled, guidance=None):
        out = model(hidden_states=pack(lat), encoder_hidden_states=ctx, pooled_projections=pooled,
                    timestep=sigma, guidance=guidance, img_ids=img_ids, txt_ids=txt_ids,
                    return_dict=False)[0]
        return unpack(out, case.height, case.width)
    return f


def _flux2_velocity_fn(case: Case, model):
    """Tokens row-major, ids (T, H, W, L) as Flux2Pipeline builds them: image (0, i, j, 0), text (0, 0, 0, l)."""
    import torch

    rows, cols = np.meshgrid(np.arange(case.height), np.arange(case.width), indexing="ij")
    zeros = np.zeros(case.height * case.width)
    img_ids = torch.tensor(np.stack([zeros, rows.ravel(), cols.ravel(), zeros], -1), dtype=torch.float32)
    txt_ids = torch.zeros(case.txt_tokens, 4)
    txt_ids[:, 3] = torch.arange(case.txt_tokens)

    def f(lat, sigma, ctx, pooled=None, guidance=None):
        b, h, w, c = lat.shape
        out = model(hidden_states=lat.reshape(b, h * w, c), encoder_hidden_states=ctx, timestep=sigma,
                    guidance=guidance, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return out.reshape(b, h, w, c)
    return f


def ours_config(case: Case):
    from mmdit_jax.flux.config import FluxConfig
    from mmdit_jax.flux2.config import Flux2Config
    from mmdit_jax.sd3.config import MMDiTConfig

    cls = {"sd3": MMDiTConfig, "flux": FluxConfig, "flux2": Flux2Config}[case.layout]
    return cls.from_diffusers(case.diffusers_kwargs)


def flops(case: Case) -> dict:
    cfg = ours_config(case)
    fn = {"sd3": common.flops_sd3, "flux": common.flops_flux, "flux2": common.flops_flux2}[case.layout]
    return fn(cfg, case.batch, case.img_tokens, case.txt_tokens)
