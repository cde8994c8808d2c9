"""Training-step throughput and model FLOP utilisation (MFU) of the trainer's own step: the jitted,
donated train step (AdamW + EMA, float32 masters) on synthetic encoded batches, for a family preset
narrowed to a few blocks (or whole, `--full`), per compute dtype and remat policy.

MFU = analytic training FLOPs (3x the forward count of common.py) per second over the device's dense
peak for the compute dtype: the vendor figure for known accelerators (`PEAK_TFLOPS`, or --peak_tflops),
the measured float32 matmul rate on CPU.

    python benchmarks/trainer_step.py [--preset sd3-medium] [--layers 2] [--width 4] [--batch 2]
        [--latent 32] [--text 77] [--dtypes float32,bfloat16] [--remats none,full] [--steps 5]
    # the GPU target, SD3-medium at 1024x1024 (128x128 latents), bf16, one GPU:
    python benchmarks/trainer_step.py --preset sd3-medium --full --batch 4 --latent 128 --text 333 \
        --dtypes bfloat16 --remats none,dots,full
"""
import argparse
import dataclasses
import platform
import time

import common  # noqa: F401  (puts this checkout first on sys.path)

import jax
import numpy as np

import mmdit_jax as mj
from mmdit_jax.sharding import make_mesh
from mmdit_jax.lora import LoraConfig
from mmdit_jax.training.config import LoraTrainConfig, ModelConfig, TrainConfig
from mmdit_jax.training.modes import TrainMode
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state
from mmdit_jax.training.step import jit_train_step


# dense tensor-core peaks (no sparsity), TFLOP/s, by the start of jax's device_kind
PEAK_TFLOPS = {"bfloat16": {"NVIDIA H100": 989.4, "NVIDIA H200": 989.4, "NVIDIA H800": 989.4,
                            "NVIDIA A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v6 lite": 918.0,
                            "TPU v4": 275.0},
               "float32": {"NVIDIA H100": 494.7, "NVIDIA H200": 494.7, "NVIDIA A100": 156.0}}  # TF32


def device_peak(dtype: str, override: float | None = None) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for the first device."""
    if override:
        return override * 1e12, "--peak_tflops"
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.get(dtype, {}).items():
        if kind.startswith(name):
            return tflops * 1e12, f"{name} datasheet, {dtype} dense"
    if jax.default_backend() == "cpu":
        return common.matmul_peak((1024, 2048), reps=3)["jax_flops"], "measured float32 matmul rate"
    raise SystemExit(f"no peak known for {kind!r} in {dtype}: pass --peak_tflops")


def narrowed(preset, layers, width):
    cfg = mj.preset(preset)
    if layers <= 0:  # --full: the released network
        return cfg
    if cfg.family == "sd3":
        dual = tuple(i for i in cfg.dual_attention_layers if i < layers - 1)
        return dataclasses.replace(cfg, num_layers=layers, num_heads=width, dual_attention_layers=dual)
    return dataclasses.replace(cfg, depth=layers, depth_single=2 * layers, num_heads=width)


def measure(net, dtype, remat, batch, latent, text, steps, lora_rank=0):
    """(first step s, steps/s). lora_rank > 0: rank-r adapters on the attention of a frozen bfloat16 base
    with random weights (the flux-dev-lora preset's setting), no EMA; else the whole network with EMA."""
    cfg = TrainConfig(model=ModelConfig(preset="sd3-medium", compute_dtype=dtype, remat=remat), batch_size=batch)
    frozen = ()
    if lora_rank:
        cfg = cfg.replace(lora=LoraTrainConfig(enabled=True, adapter=LoraConfig(rank=lora_rank, targets="attn"),
                                               base_dtype="bfloat16"))
    mode = TrainMode(cfg, net)
    model = mj.Transformer(net, None)
    tx = make_optimizer(cfg.optim, 1000, mode.trainable_mask(model))
    mesh = make_mesh({"fsdp": -1})
    state, sh = create_state(model, tx, mesh, 0, not lora_rank, mode=mode)
    frozen_sh = None
    if lora_rank:
        base = mj.Transformer.init(net, seed=1, dtype="bfloat16").params
        frozen, frozen_sh = mode.frozen(base, None, model, mesh)
        frozen = (frozen,)
        del base
    step = jit_train_step(model, tx, cfg, mesh, sh, mode=mode, frozen_sh=frozen_sh)
    r = np.random.default_rng(0)
    ch = getattr(net, "latent_channels", None) or net.in_channels
    b = dict(latents=r.standard_normal((batch, latent, latent, ch), np.float32),
             context=r.standard_normal((batch, text, net.context_dim), np.float32),
             pooled=r.standard_normal((batch, net.pooled_dim), np.float32))
    t = time.perf_counter()
    state, m = step(state, b, *frozen)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b, *frozen)
    jax.block_until_ready(m)
    return first, steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sd3-medium")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=4, help="attention heads (x the preset's head dim)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--text", type=int, default=77)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--remats", default="none,full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="the preset as released (ignores --layers/--width)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak for the MFU column")
    a = ap.parse_args()
    net = narrowed(a.preset, 0 if a.full else a.layers, a.width)
    p = net.patch_size if net.family == "sd3" else 2  # FLUX packs 2x2 latent pixels per token
    img = (a.latent // p) ** 2
    flops = 3 * (common.flops_sd3 if net.family == "sd3" else common.flops_flux)(net, a.batch, img, a.text)["total"]
    print(f"{a.preset} narrowed: {mj.count_params(net) / 1e6:.1f} M params; batch {a.batch}, latent "
          f"{a.latent}x{a.latent}, {a.text} text tokens; {jax.devices()[0].device_kind} "
          f"({platform.machine()}), jax {jax.__version__}")
    print(f"analytic training FLOPs per step: {flops / 1e12:.3f} TFLOP")
    print("| compute dtype | remat | first step s (compile) | steps/s | images/s | TFLOP/s | MFU (of peak) |\n"
          "|---|---|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        peak, source = device_peak(dtype, a.peak_tflops)
        for remat in a.remats.split(","):
            first, rate = measure(net, dtype, remat, a.batch, a.latent, a.text, a.steps)
            print(f"| {dtype} | {remat} | {first:.1f} | {rate:.2f} | {rate * a.batch:.2f} | "
                  f"{flops * rate / 1e12:.2f} | {100 * flops * rate / peak:.0f}% (of {peak / 1e12:.1f}, "
                  f"{source}) |", flush=True)


if __name__ == "__main__":
    main()
