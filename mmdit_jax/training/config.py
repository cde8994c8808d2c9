"""Training configuration: frozen dataclasses, a presets registry, and `--set key=value` overrides.

A config is chosen by `--config=NAME` (a registered preset) or `--config=path/to/file.py` (a Python
file defining `get_config()` that returns a TrainConfig); `--set=section.field=value` then replaces any
field (repeatable). Every value is checked by `validate` before any work starts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import typing
from typing import Callable

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths

from mmdit_jax.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # exactly one of: a family preset name, a diffusers config.json dict (custom size), both from
    # scratch; or `pretrained`, a path mj.load_transformer reads (full finetuning)
    preset: str | None = None
    diffusers_config: dict | None = None
    pretrained: str | None = None
    compute_dtype: str = "bfloat16"  # activations and matmuls; master weights stay float32
    remat: str = "none"  # stacking.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    schedule: str = "constant"  # "constant" | "cosine" (to lr * min_lr_ratio at max_steps)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_norm: float = 1.0  # global gradient norm; 0 disables
    grad_accum: int = 1  # microbatches per optimizer step (the batch is split, scanned, averaged)


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    decay: float = 0.9999  # 0 disables EMA
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)) as in diffusers' EMAModel


@dataclasses.dataclass(frozen=True)
class TimestepConfig:
    sampler: str = "logit_normal"  # "uniform" | "logit_normal" | "mode" | "cosmap"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: str = "none"  # "none" | "fixed" | "resolution" | "flux"
    shift_value: float = 3.0  # "fixed": the shift; "resolution": the shift at reference_resolution
    # "resolution": pixels per side where the shift is shift_value (SD3: 3.0 at 1024), times sqrt(m/n) elsewhere
    reference_resolution: int = 1024
    base_shift: float = 0.5  # "flux": mu = linear in image tokens, as diffusers' calculate_shift
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096


@dataclasses.dataclass(frozen=True)
class LossConfig:
    weighting: str = "none"  # "none" | "sigma_sqrt" | "cosmap"
    encoder_dropout: float = 0.463  # each text encoder zeroed independently (SD3 paper)
    caption_dropout: float = 0.0  # whole caption replaced by the empty caption's encoding (CFG)
    guidance: float = 1.0  # fed to a guidance embedder (FLUX.1-dev) when the model has one


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10  # progress line, JSONL and TensorBoard scalars
    val_every: int = 500  # validation loss on fixed (t, noise) pairs; 0 disables
    val_batches: int = 1
    sample_every: int = 0  # sample grid for `sample_prompts`; 0 disables
    sample_prompts: tuple[str, ...] = ("a photo of a cat", "a red circle on a blue square")
    sample_steps: int = 20
    sample_guidance: float = 4.0
    sample_resolution: int = 256


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 takes the devices left over
    tensor: int = 1
    sequence: int = 1


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    # a registered base maker (training.hooks; "toy", "toy-flux") writes the pipeline folder the run
    # trains from into WORKDIR/base, once; it then stands in for model.pretrained and encoders
    maker: str | None = None
    options: dict | None = None  # maker-specific settings (toy: ToyConfig fields)
    seed: int = 0  # the base's random initialisation


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # after the last step (and on rerunning a finished run): sample through mj.Pipeline, score, write
    # WORKDIR/eval/; "toy": held-out prompts scored by the toy checker
    kind: str = "none"  # "none" | a kind registered in training.hooks
    steps: int = 20
    guidance: float = 3.0
    seeds: tuple[int, ...] = (0, 1)
    max_prompts: int = 0  # 0: every held-out prompt


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    # train low-rank adapters on a frozen base (model.pretrained); only the adapters are optimised
    enabled: bool = False
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    targets: str = "attn"  # "attn" | "attn_mlp" | "all" (mmdit_jax.lora.adapter.PRESETS)
    embedders: bool = False
    blocks: tuple[int, ...] | None = None  # joint / FLUX double block indices (None: all)
    single_blocks: tuple[int, ...] | None = None  # FLUX single blocks (None: all)
    base_dtype: str = "float32"  # the frozen base's dtype ("bfloat16" halves its memory)
    format: str = "diffusers"  # WORKDIR/lora file layout: "diffusers" | "kohya" | "comfyui"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # guidance distillation: a student with a guidance embedder regresses the frozen teacher's CFG velocity
    enabled: bool = False
    teacher: str | None = None  # what mj.load_transformer reads; None: model.pretrained
    guidance_min: float = 1.0
    guidance_max: float = 7.0
    teacher_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    timesteps: TimestepConfig = TimestepConfig()
    loss: LossConfig = LossConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    mesh: MeshConfig = MeshConfig()
    base: BaseConfig = BaseConfig()
    eval: EvalConfig = EvalConfig()
    lora: LoraTrainConfig = LoraTrainConfig()
    distill: DistillConfig = DistillConfig()
    batch_size: int = 8  # per process, per optimizer step
    max_steps: int = 10000
    seed: int = 0
    encoders: str | None = None  # pipeline folder with vae/ + text encoders (default: model.pretrained)
    data_factory: str | None = None  # a name registered with training.data.register_data_factory

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------------------------- presets
_PRESETS: dict[str, Callable[[], TrainConfig]] = {}


def register_preset(name: str, fn: Callable[[], TrainConfig]) -> None:
    _PRESETS[name] = fn


def presets() -> list[str]:
    return sorted(_PRESETS)


def _sd3_finetune():
    return TrainConfig(
        model=ModelConfig(remat="dots"),  # --set=model.pretrained=PIPELINE_FOLDER
        optim=OptimConfig(lr=1e-5, warmup_steps=500),
        timesteps=TimestepConfig(sampler="logit_normal", shift="fixed", shift_value=3.0),
        data=DataConfig(kind="folder", resolution=1024), batch_size=4)


def _flux_finetune():
    return TrainConfig(
        model=ModelConfig(remat="dots"),  # --set=model.pretrained=PIPELINE_FOLDER
        optim=OptimConfig(lr=1e-5, warmup_steps=500),
        timesteps=TimestepConfig(sampler="logit_normal", shift="flux"),
        loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.1, guidance=1.0),
        data=DataConfig(kind="folder", resolution=1024), batch_size=1)


def _debug():
    # a few-layer SD3 network that trains on CPU in seconds
    return TrainConfig(
        model=ModelConfig(diffusers_config=dict(
            _class_name="SD3Transformer2DModel", num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
            pos_embed_max_size=16, sample_size=8), compute_dtype="float32"),
        optim=OptimConfig(lr=1e-3), ema=EMAConfig(decay=0.99),
        checkpoint=CheckpointConfig(every=10, keep=2), log=LogConfig(every=1, val_every=5),
        batch_size=4, max_steps=20)


def _toy(maker: str):
    def make():
        # the toy world from scratch on CPU (issue 9): benchmarks/RESULTS.md "Toy demo" has its scores
        return TrainConfig(
            base=BaseConfig(maker=maker, options=dict(clip_length=12)),
            model=ModelConfig(compute_dtype="float32"),
            data=DataConfig(kind="toy", resolution=32, max_sequence_length=12),
            optim=OptimConfig(lr=2e-3, b2=0.99, weight_decay=0.0, schedule="cosine", warmup_steps=100,
                              min_lr_ratio=0.1),
            ema=EMAConfig(decay=0.999),
            timesteps=TimestepConfig(sampler="logit_normal", shift="none"),
            loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.1),
            checkpoint=CheckpointConfig(every=500, keep=2),
            log=LogConfig(every=50, val_every=0),
            eval=EvalConfig(kind="toy", steps=20, guidance=3.0, seeds=(0, 1)),
            batch_size=32, max_steps=1500)
    return make


register_preset("toy", _toy("toy"))
register_preset("toy-flux", _toy("toy-flux"))


def _sd3_lora():
    # --set=model.pretrained=PIPELINE_FOLDER; the result is WORKDIR/lora/pytorch_lora_weights.safetensors
    return TrainConfig(
        model=ModelConfig(remat="dots"), optim=OptimConfig(lr=1e-4, warmup_steps=100, weight_decay=1e-4),
        ema=EMAConfig(decay=0.0), timesteps=TimestepConfig(sampler="logit_normal", shift="fixed", shift_value=3.0),
        lora=LoraTrainConfig(enabled=True, rank=16, targets="attn", base_dtype="bfloat16"),
        data=DataConfig(kind="folder", resolution=1024), batch_size=4, max_steps=2000)


def _flux_lora():
    return TrainConfig(
        model=ModelConfig(remat="dots"), optim=OptimConfig(lr=1e-4, warmup_steps=100, weight_decay=1e-4),
        ema=EMAConfig(decay=0.0), timesteps=TimestepConfig(sampler="logit_normal", shift="flux"),
        loss=LossConfig(encoder_dropout=0.0, caption_dropout=0.0, guidance=1.0),
        lora=LoraTrainConfig(enabled=True, rank=16, targets="attn", base_dtype="bfloat16"),
        data=DataConfig(kind="folder", resolution=1024), batch_size=1, max_steps=2000)


def _guidance_distill():
    # --set=model.pretrained=TEACHER (e.g. an mmdit-convert folder); the student starts as the teacher
    return TrainConfig(
        model=ModelConfig(remat="dots"), optim=OptimConfig(lr=1e-5, warmup_steps=200),
        timesteps=TimestepConfig(sampler="logit_normal", shift="fixed", shift_value=3.0),
        loss=LossConfig(encoder_dropout=0.0),
        distill=DistillConfig(enabled=True, guidance_min=1.0, guidance_max=7.0),
        data=DataConfig(kind="folder", resolution=1024), batch_size=4, max_steps=5000)


register_preset("sd3-medium-finetune", _sd3_finetune)
register_preset("sd3-medium-lora", _sd3_lora)
register_preset("flux-dev-lora", _flux_lora)
register_preset("guidance-distill", _guidance_distill)
register_preset("flux-dev-finetune", _flux_finetune)
register_preset("debug", _debug)


def load_config(spec: str | None) -> TrainConfig:
    """`spec`: a preset name, a Python file defining get_config(), or None for the defaults."""
    if not spec:
        return TrainConfig()
    if spec in _PRESETS:
        return _PRESETS[spec]()
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise MMDiTError(f"--config: file {spec} does not exist")
        mod_spec = importlib.util.spec_from_file_location("_mmdit_train_config", spec)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a user's file: report, do not trace back
            raise MMDiTError(f"--config: {spec} failed to load ({type(e).__name__}: {e})") from None
        if not callable(getattr(module, "get_config", None)):
            raise MMDiTError(f"--config: {spec} defines no get_config()")
        cfg = module.get_config()
        if not isinstance(cfg, TrainConfig):
            raise MMDiTError(f"--config: {spec}: get_config() returned {type(cfg).__name__}, "
                             "not a TrainConfig")
        return cfg
    raise MMDiTError(f"--config: {spec!r} is neither a preset ({', '.join(presets())}) nor a .py file")


# ---------------------------------------------------------------------------------------------- overrides
def _convert(text: str, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(text, inner, key)
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is tuple:
            parts = [p for p in text.split(",") if p != ""] if "|" not in text else text.split("|")
            return tuple(_convert(p.strip(), args[0], key) for p in parts)
        if tp is dict or origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except (ValueError, json.JSONDecodeError):
        raise MMDiTError(f"--set={key}={text}: not a valid {getattr(tp, '__name__', tp)}") from None
    raise MMDiTError(f"--set={key}: fields of type {tp} cannot be set from the command line")


def override(cfg, key: str, text: str):
    """`cfg` with the dotted field `key` set from the string `text` (converted to the field's type)."""
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise MMDiTError(f"--set={key}: unknown field {head!r} in {type(cfg).__name__}; known: "
                         f"{', '.join(fields)}")
    hints = typing.get_type_hints(type(cfg))
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise MMDiTError(f"--set={key}: {head!r} has no sub-fields")
        return dataclasses.replace(cfg, **{head: override(current, rest, text)})
    if dataclasses.is_dataclass(current):
        raise MMDiTError(f"--set={key}: {head!r} is a section; set one of its fields")
    return dataclasses.replace(cfg, **{head: _convert(text, hints[head], key)})


def apply_overrides(cfg: TrainConfig, items) -> TrainConfig:
    for item in items or ():
        key, eq, text = item.partition("=")
        if not eq:
            raise MMDiTError(f"--set={item}: expected section.field=value")
        cfg = override(cfg, key.strip(), text)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------- validation
SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")
SHIFTS = ("none", "fixed", "resolution", "flux")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raises MMDiTError naming the first bad field (as its --set key)."""
    from mmdit_jax.stacking import REMAT_POLICIES

    def need(ok, key, why):
        if not ok:
            raise MMDiTError(f"--set={key}: {why} (got {_get(cfg, key)!r})")

    m = cfg.model
    sources = [m.preset is not None, m.diffusers_config is not None, m.pretrained is not None,
               cfg.base.maker is not None]
    need(sum(sources) == 1, "model.preset", "set exactly one of model.preset, model.diffusers_config, "
         "model.pretrained, base.maker")
    if cfg.base.maker is not None:
        from mmdit_jax.training import hooks

        need(cfg.base.maker in hooks.base_makers(), "base.maker",
             f"not registered; known: {sorted(hooks.base_makers())}")
        need(cfg.encoders is None, "encoders", "must be unset with base.maker (the base provides them)")
    if m.preset is not None:
        from mmdit_jax.families import preset

        preset(m.preset)  # raises with the list of known presets
    need(m.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", f"one of {COMPUTE_DTYPES}")
    need(m.remat in REMAT_POLICIES, "model.remat", f"one of {sorted(REMAT_POLICIES)}")
    o = cfg.optim
    need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
    need(0 <= o.b1 < 1, "optim.b1", "must be in [0, 1)")
    need(0 <= o.b2 < 1, "optim.b2", "must be in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be positive")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}")
    need(0 <= o.warmup_steps, "optim.warmup_steps", "must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    need(o.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    need(cfg.batch_size % o.grad_accum == 0, "optim.grad_accum", f"must divide batch_size {cfg.batch_size}")
    need(0 <= cfg.ema.decay < 1, "ema.decay", "must be in [0, 1) (0 disables EMA)")
    t = cfg.timesteps
    need(t.sampler in SAMPLERS, "timesteps.sampler", f"one of {SAMPLERS}")
    need(t.logit_std > 0, "timesteps.logit_std", "must be positive")
    # mode sampling is a monotone map of u (a valid density) only for scale in [-1, 2/(pi-2)]
    need(-1 <= t.mode_scale <= 2 / (math.pi - 2), "timesteps.mode_scale", "must be in [-1, 1.75]")
    need(t.shift in SHIFTS, "timesteps.shift", f"one of {SHIFTS}")
    need(t.shift_value > 0, "timesteps.shift_value", "must be positive")
    need(t.reference_resolution > 0, "timesteps.reference_resolution", "must be positive")
    need(t.max_seq_len > t.base_seq_len > 0, "timesteps.max_seq_len", "must exceed base_seq_len > 0")
    lo = cfg.loss
    need(lo.weighting in WEIGHTINGS, "loss.weighting", f"one of {WEIGHTINGS}")
    need(0 <= lo.encoder_dropout <= 1, "loss.encoder_dropout", "must be a probability")
    need(0 <= lo.caption_dropout <= 1, "loss.caption_dropout", "must be a probability")
    need(lo.guidance >= 0, "loss.guidance", "must be >= 0")
    c = cfg.checkpoint
    need(c.every >= 1, "checkpoint.every", "must be >= 1")
    need(c.keep >= 1, "checkpoint.keep", "must be >= 1")
    lg = cfg.log
    need(lg.every >= 1, "log.every", "must be >= 1")
    for k in ("val_every", "sample_every"):
        need(getattr(lg, k) >= 0, f"log.{k}", "must be >= 0 (0 disables)")
    need(lg.val_batches >= 1, "log.val_batches", "must be >= 1")
    need(lg.sample_steps >= 1, "log.sample_steps", "must be >= 1")
    need(lg.sample_resolution >= 16, "log.sample_resolution", "must be >= 16")
    need(cfg.max_steps >= 1, "max_steps", "must be >= 1")
    for axis in ("data", "fsdp", "tensor", "sequence"):
        size = getattr(cfg.mesh, axis)
        need(size == -1 or size >= 1, f"mesh.{axis}", "must be >= 1 or -1 (fill)")
    need([getattr(cfg.mesh, a) for a in ("data", "fsdp", "tensor", "sequence")].count(-1) <= 1,
         "mesh.fsdp", "at most one mesh axis may be -1")
    if cfg.data_factory is None and cfg.data.kind in ("folder", "arrayrecord"):
        need(bool(cfg.data.path), "data.path", f"data kind {cfg.data.kind!r} needs a path")
    if cfg.data_factory is not None:
        from mmdit_jax.training.data import factories

        need(cfg.data_factory in factories(), "data_factory", f"not registered; known: {sorted(factories())}")
    ev = cfg.eval
    if ev.kind != "none":
        from mmdit_jax.training import hooks

        need(ev.kind in hooks.evaluators(), "eval.kind", f"'none' or one of {sorted(hooks.evaluators())}")
    need(ev.steps >= 1, "eval.steps", "must be >= 1")
    need(ev.guidance >= 0, "eval.guidance", "must be >= 0")
    need(len(ev.seeds) >= 1, "eval.seeds", "needs at least one seed")
    need(ev.max_prompts >= 0, "eval.max_prompts", "must be >= 0 (0: all)")
    lr, ds = cfg.lora, cfg.distill
    if lr.enabled:
        from mmdit_jax.lora.adapter import PRESETS as LORA_TARGETS
        from mmdit_jax.lora.formats import FORMATS as LORA_FORMATS

        need(m.pretrained is not None, "model.pretrained", "LoRA training adapts a pretrained base: set it")
        need(lr.rank >= 1, "lora.rank", "must be >= 1")
        need(lr.alpha is None or lr.alpha > 0, "lora.alpha", "must be positive (or none: alpha = rank)")
        need(0 <= lr.dropout < 1, "lora.dropout", "must be in [0, 1)")
        need(lr.targets in LORA_TARGETS, "lora.targets", f"one of {sorted(LORA_TARGETS)}")
        need(lr.base_dtype in COMPUTE_DTYPES, "lora.base_dtype", f"one of {COMPUTE_DTYPES}")
        need(lr.format in LORA_FORMATS, "lora.format", f"one of {LORA_FORMATS}")
        for k in ("blocks", "single_blocks"):
            v = getattr(lr, k)
            need(v is None or (len(v) > 0 and min(v) >= 0), f"lora.{k}", "block indices >= 0 (or none: all)")
    if ds.enabled:
        need(not lr.enabled, "distill.enabled", "guidance distillation trains the whole student; "
             "it cannot be combined with lora.enabled")
        need(ds.teacher is not None or m.pretrained is not None, "distill.teacher",
             "set distill.teacher or model.pretrained (the student starts as the teacher)")
        need(0 <= ds.guidance_min <= ds.guidance_max, "distill.guidance_max",
             f"need 0 <= guidance_min ({ds.guidance_min}) <= guidance_max")
        need(ds.teacher_dtype in COMPUTE_DTYPES, "distill.teacher_dtype", f"one of {COMPUTE_DTYPES}")
        if ds.teacher is not None:
            need(paths.exists(ds.teacher), "distill.teacher", "no such file or folder")
    if lg.sample_every and cfg.encoders is None and m.pretrained is None and cfg.base.maker is None:
        raise MMDiTError("--set=log.sample_every: sample grids need text encoders and a VAE: set encoders "
                         "(a pipeline folder) or model.pretrained")
    return cfg


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
