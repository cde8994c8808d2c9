"""`mmdit-train ... --plan`: the memory one training step needs per device, before any weight exists.

Parameters, optimizer state, EMA, the frozen tree (LoRA base, distillation teacher) and the batch are
exact: bytes of each leaf's shard, from the abstract state's shapes and shardings (jax.eval_shape; no
weight is computed). The step's temporaries are what XLA reports for the train step compiled on the
current backend with abstract inputs (`memory_analysis()`), so a pod's plan can be made on CPU with
virtual devices (XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""
from __future__ import annotations

import math
import sys
import time

import jax
import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths

VAE_SCALE = 8  # latent pixels per image pixel side, every supported family


def text_length(family: str, max_sequence_length: int | None) -> int:
    """Context rows the family's text encoders produce per prompt."""
    from mmdit_jax.families import family_named

    return family_named(family).text.encoders.context_length(max_sequence_length)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs or arrays carrying NamedShardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(cfg, net_cfg, mesh, process_count: int = 1) -> dict:
    """The step's batch for cfg.data.resolution square images, as ShapeDtypeStructs in its sharding."""
    from mmdit_jax.training.step import batch_sharding

    sh = batch_sharding(mesh)
    b = cfg.batch_size * process_count
    side = cfg.data.resolution // VAE_SCALE
    ch = getattr(net_cfg, "latent_channels", None) or net_cfg.in_channels
    n = text_length(net_cfg.family, cfg.data.max_sequence_length)
    shapes = dict(latents=(b, side, side, ch), context=(b, n, net_cfg.context_dim), pooled=(b, net_cfg.pooled_dim))
    return {k: jax.ShapeDtypeStruct(s, np.float32, sharding=sh) for k, s in shapes.items()}


def plan(cfg, net_cfg, teacher_cfg=None, *, compile_step: bool = True) -> dict:
    """{row: bytes per device} for `cfg` on the mesh cfg.mesh over this process's devices.

    Rows: params, optimizer (moments, counters, key), ema, frozen, batch (exact); with compile_step
    also temporaries, outputs (not aliased to a donated input) and compile_s, from XLA."""
    from mmdit_jax.sharding import MESH_AXES, make_mesh
    from mmdit_jax.training.modes import TrainMode
    from mmdit_jax.training.optim import make_optimizer
    from mmdit_jax.training.state import create_state
    from mmdit_jax.training.step import jit_train_step
    from mmdit_jax.transformer import Transformer

    try:
        mesh = make_mesh({a: getattr(cfg.mesh, a) for a in MESH_AXES})
    except ValueError as e:
        raise MMDiTError(f"--mesh_*: {e}") from None
    mode = TrainMode(cfg, net_cfg, teacher_cfg)
    model = Transformer(mode.net_config, None, "float32")
    base = Transformer(mode.base_config, None, "float32")
    tx = make_optimizer(cfg.optim, cfg.max_steps, mode.trainable_mask(model))
    state, state_sh = create_state(model, tx, mesh, cfg.seed, cfg.ema.decay > 0, abstract_only=True, mode=mode)
    frozen, frozen_sh = mode.frozen_abstract(base, mesh)
    batch = abstract_batch(cfg, mode.net_config, mesh, jax.process_count())
    out = dict(params=per_device_bytes(state.params),
               optimizer=per_device_bytes((state.opt_state, state.step, state.rng)),
               ema=per_device_bytes(state.ema) if state.ema is not None else 0,
               frozen=per_device_bytes(frozen) if frozen is not None else 0,
               batch=per_device_bytes(batch))
    if compile_step:
        # no text layout or empty caption: the text dropout's few elementwise masks are left out
        step = jit_train_step(model, tx, cfg, mesh, state_sh, (), None, mode, frozen_sh)
        t = time.perf_counter()
        compiled = step.lower(state, batch, *(() if frozen is None else (frozen,))).compile()
        out["compile_s"] = time.perf_counter() - t
        ma = compiled.memory_analysis()
        out["temporaries"] = int(ma.temp_size_in_bytes)
        out["outputs"] = int(max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0))
    out["mesh"] = dict(mesh.shape)
    return out


def total_bytes(rows: dict) -> int:
    keys = ("params", "optimizer", "ema", "frozen", "batch", "temporaries", "outputs")
    return sum(int(rows.get(k, 0)) for k in keys)


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:9.3f} GiB"


def print_plan(cfg, net_cfg, teacher_cfg=None, *, out=sys.stdout, compile_step: bool = True) -> dict:
    from mmdit_jax.transformer import count_params

    rows = plan(cfg, net_cfg, teacher_cfg, compile_step=compile_step)
    devices = jax.devices()
    kind = "LoRA adapters" if cfg.lora.enabled else "distilled student" if cfg.distill.enabled else "full network"
    print(f"plan: {net_cfg.family} network of {count_params(net_cfg) / 1e6:,.1f} M parameters, training the "
          f"{kind}; batch {cfg.batch_size * jax.process_count()} at {cfg.data.resolution}x{cfg.data.resolution}, "
          f"remat {cfg.model.remat}, {cfg.model.compute_dtype} compute", file=out)
    mesh = " ".join(f"{a}={n}" for a, n in rows["mesh"].items())
    print(f"mesh {mesh} over {len(devices)} {devices[0].platform} devices; bytes per device:", file=out)
    names = dict(params="parameters", optimizer="optimizer state", ema="EMA", frozen="frozen tree",
                 batch="batch")
    for key, name in names.items():
        print(f"  {name:<16} {rows[key]:>16,d} B {_gib(rows[key])}  (exact)", file=out)
    if compile_step:
        backend = jax.default_backend()
        for key, name in (("temporaries", "temporaries"), ("outputs", "step outputs")):
            print(f"  {name:<16} {rows[key]:>16,d} B {_gib(rows[key])}  (XLA memory_analysis on {backend})",
                  file=out)
    print(f"  {'total':<16} {total_bytes(rows):>16,d} B {_gib(total_bytes(rows))}", file=out)
    if compile_step:
        print(f"(the step compiled in {rows['compile_s']:.0f} s)", file=out)
    out.flush()
    return rows


def run_plan(cfg, workdir: str | None, *, out=sys.stdout) -> dict:
    """The plan for a validated config, its network read from where training would read it (a
    pretrained folder's config only: no weight is read)."""

    from mmdit_jax.training.hooks import prepare_base
    from mmdit_jax.training.loop import network_config
    from mmdit_jax.transformer import transformer_weights

    if cfg.base.maker is not None:
        cfg = prepare_base(cfg, workdir or ".", out, write=False)
        if not paths.isdir(cfg.model.pretrained):
            raise MMDiTError(f"--plan: base.maker writes {cfg.model.pretrained} on the first run; plan after it "
                             "(the same --workdir) or from model.preset")
    m = cfg.model
    net = transformer_weights(m.pretrained).config if m.pretrained is not None else network_config(m)
    d = cfg.distill
    teacher = (transformer_weights(d.teacher).config if d.enabled and d.teacher not in (None, m.pretrained)
               else None)
    return print_plan(cfg, net, teacher, out=out)
