"""Training configuration: frozen dataclasses that validate themselves, presets, and `--set` overrides.

A config is chosen by `--config=NAME` (a preset: mmdit_jax/configs/NAME.py with dashes and dots as
underscores, or one registered with `register_preset`) or `--config=path/to/file.py` (a Python file
defining `get_config()` that returns a TrainConfig); `--set=section.field=value` then replaces any field
(repeatable). Each section checks its own fields when built; `validate` adds the checks that span
sections or look at registries and files, before any work starts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import typing
from typing import Callable, ClassVar

from mmdit_jax.data.config import DataConfig
from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.lora.adapter import LoraConfig

SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")
SHIFTS = ("none", "fixed", "resolution", "flux")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")
CONFIGS_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def need(ok: bool, key: str, why: str, got) -> None:
    """Raises MMDiTError naming the field as its --set key."""
    if not ok:
        raise MMDiTError(f"--set={key}: {why} (got {got!r})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # exactly one of: a family preset name, a diffusers config.json dict (custom size), both from
    # scratch; or `pretrained`, a path mj.load_transformer reads (full finetuning)
    preset: str | None = None
    diffusers_config: dict | None = None
    pretrained: str | None = None
    compute_dtype: str = "bfloat16"  # activations and matmuls; master weights stay float32
    remat: str = "none"  # stacking.REMAT_POLICIES

    def __post_init__(self):
        from mmdit_jax.stacking import REMAT_POLICIES

        if self.preset is not None:
            from mmdit_jax.families import preset

            preset(self.preset)  # raises with the list of known presets
        need(self.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", f"one of {COMPUTE_DTYPES}",
             self.compute_dtype)
        need(self.remat in REMAT_POLICIES, "model.remat", f"one of {sorted(REMAT_POLICIES)}", self.remat)


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

    def __post_init__(self):
        need(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "must be a positive number", self.lr)
        need(0 <= self.b1 < 1, "optim.b1", "must be in [0, 1)", self.b1)
        need(0 <= self.b2 < 1, "optim.b2", "must be in [0, 1)", self.b2)
        need(self.eps > 0, "optim.eps", "must be positive", self.eps)
        need(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        need(self.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}", self.schedule)
        need(0 <= self.warmup_steps, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        need(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        need(self.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)", self.clip_norm)
        need(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1", self.grad_accum)


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    decay: float = 0.9999  # 0 disables EMA
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)) as in diffusers' EMAModel

    def __post_init__(self):
        need(0 <= self.decay < 1, "ema.decay", "must be in [0, 1) (0 disables EMA)", self.decay)


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

    def __post_init__(self):
        need(self.sampler in SAMPLERS, "timesteps.sampler", f"one of {SAMPLERS}", self.sampler)
        need(self.logit_std > 0, "timesteps.logit_std", "must be positive", self.logit_std)
        # mode sampling is a monotone map of u (a valid density) only for scale in [-1, 2/(pi-2)]
        need(-1 <= self.mode_scale <= 2 / (math.pi - 2), "timesteps.mode_scale", "must be in [-1, 1.75]",
             self.mode_scale)
        need(self.shift in SHIFTS, "timesteps.shift", f"one of {SHIFTS}", self.shift)
        need(self.shift_value > 0, "timesteps.shift_value", "must be positive", self.shift_value)
        need(self.reference_resolution > 0, "timesteps.reference_resolution", "must be positive",
             self.reference_resolution)
        need(self.max_seq_len > self.base_seq_len > 0, "timesteps.max_seq_len", "must exceed base_seq_len > 0",
             self.max_seq_len)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    weighting: str = "none"  # "none" | "sigma_sqrt" | "cosmap"
    encoder_dropout: float = 0.463  # each text encoder zeroed independently (SD3 paper)
    caption_dropout: float = 0.0  # whole caption replaced by the empty caption's encoding (CFG)
    guidance: float = 1.0  # fed to a guidance embedder (FLUX.1-dev) when the model has one

    def __post_init__(self):
        need(self.weighting in WEIGHTINGS, "loss.weighting", f"one of {WEIGHTINGS}", self.weighting)
        need(0 <= self.encoder_dropout <= 1, "loss.encoder_dropout", "must be a probability", self.encoder_dropout)
        need(0 <= self.caption_dropout <= 1, "loss.caption_dropout", "must be a probability", self.caption_dropout)
        need(self.guidance >= 0, "loss.guidance", "must be >= 0", self.guidance)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        need(self.every >= 1, "checkpoint.every", "must be >= 1", self.every)
        need(self.keep >= 1, "checkpoint.keep", "must be >= 1", self.keep)


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

    def __post_init__(self):
        need(self.every >= 1, "log.every", "must be >= 1", self.every)
        for k in ("val_every", "sample_every"):
            need(getattr(self, k) >= 0, f"log.{k}", "must be >= 0 (0 disables)", getattr(self, k))
        need(self.val_batches >= 1, "log.val_batches", "must be >= 1", self.val_batches)
        need(self.sample_steps >= 1, "log.sample_steps", "must be >= 1", self.sample_steps)
        need(self.sample_resolution >= 16, "log.sample_resolution", "must be >= 16", self.sample_resolution)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 takes the devices left over
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for axis, size in sizes.items():
            need(size == -1 or size >= 1, f"mesh.{axis}", "must be >= 1 or -1 (fill)", size)
        need(list(sizes.values()).count(-1) <= 1, "mesh.fsdp", "at most one mesh axis may be -1", self.fsdp)


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    # a registered base maker (training.hooks) writes the pipeline folder the run trains from into
    # WORKDIR/base, once; it then stands in for model.pretrained and encoders
    maker: str | None = None
    options: dict | None = None  # maker-specific settings
    seed: int = 0  # the base's random initialisation


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # after the last step (and on rerunning a finished run): sample through mj.Pipeline, score, write
    # WORKDIR/eval/ with the evaluator registered in training.hooks under `kind`
    kind: str = "none"  # "none" | a kind registered in training.hooks
    steps: int = 20
    guidance: float = 3.0
    seeds: tuple[int, ...] = (0, 1)
    max_prompts: int = 0  # 0: every held-out prompt

    def __post_init__(self):
        need(self.steps >= 1, "eval.steps", "must be >= 1", self.steps)
        need(self.guidance >= 0, "eval.guidance", "must be >= 0", self.guidance)
        need(len(self.seeds) >= 1, "eval.seeds", "needs at least one seed", self.seeds)
        need(self.max_prompts >= 0, "eval.max_prompts", "must be >= 0 (0: all)", self.max_prompts)


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    # train low-rank adapters (`adapter`) on a frozen base (model.pretrained); only the adapters are optimised
    enabled: bool = False
    adapter: LoraConfig = LoraConfig()
    base_dtype: str = "float32"  # the frozen base's dtype ("bfloat16" halves its memory)
    base_quantize: str | None = None  # "int8" | "fp8": the base's block kernels quantised (mmdit_jax.quant)
    format: str = "diffusers"  # WORKDIR/lora file layout: "diffusers" | "kohya" | "comfyui"
    # --set=lora.rank=8 and the like: the adapter's fields by their short names
    ALIASES: ClassVar[dict[str, str]] = {f.name: f"adapter.{f.name}" for f in dataclasses.fields(LoraConfig)}

    def __post_init__(self):
        from mmdit_jax.lora.formats import FORMATS

        need(self.base_dtype in COMPUTE_DTYPES, "lora.base_dtype", f"one of {COMPUTE_DTYPES}", self.base_dtype)
        need(self.format in FORMATS, "lora.format", f"one of {FORMATS}", self.format)
        need(self.base_quantize in (None, "int8", "fp8"), "lora.base_quantize", "one of int8, fp8 (or none)",
             self.base_quantize)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # guidance distillation: a student with a guidance embedder regresses the frozen teacher's CFG velocity
    enabled: bool = False
    teacher: str | None = None  # what mj.load_transformer reads; None: model.pretrained
    guidance_min: float = 1.0
    guidance_max: float = 7.0
    teacher_dtype: str = "float32"

    def __post_init__(self):
        need(0 <= self.guidance_min <= self.guidance_max, "distill.guidance_max",
             f"need 0 <= guidance_min ({self.guidance_min}) <= guidance_max", self.guidance_max)
        need(self.teacher_dtype in COMPUTE_DTYPES, "distill.teacher_dtype", f"one of {COMPUTE_DTYPES}",
             self.teacher_dtype)


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

    def __post_init__(self):
        need(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        need(self.batch_size % self.optim.grad_accum == 0, "optim.grad_accum",
             f"must divide batch_size {self.batch_size}", self.optim.grad_accum)
        need(self.max_steps >= 1, "max_steps", "must be >= 1", self.max_steps)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------------------------- presets
_REGISTERED: dict[str, Callable[[], TrainConfig]] = {}


def register_preset(name: str, fn: Callable[[], TrainConfig]) -> None:
    """A preset made in code (the packaged ones are files in mmdit_jax/configs/)."""
    _REGISTERED[name] = fn


def preset_file(name: str) -> str:
    """mmdit_jax/configs/NAME.py with dashes and dots as underscores: "sd3.5-medium-lora" ->
    sd3_5_medium_lora.py."""
    return os.path.join(CONFIGS_PACKAGE, name.replace("-", "_").replace(".", "_") + ".py")


def presets() -> list[str]:
    files = [f[:-3].replace("_", "-") for f in os.listdir(CONFIGS_PACKAGE)
             if f.endswith(".py") and not f.startswith("_")]
    return sorted(set(files) | set(_REGISTERED))


def load_config(spec: str | None) -> TrainConfig:
    """`spec`: a preset name, a Python file defining get_config(), or None for the defaults."""
    if not spec:
        return TrainConfig()
    if spec in _REGISTERED:
        return _REGISTERED[spec]()
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise MMDiTError(f"--config: file {spec} does not exist")
        return _config_file(spec, spec)
    if os.path.isfile(preset_file(spec)):
        return _config_file(preset_file(spec), spec)
    raise MMDiTError(f"--config: {spec!r} is neither a preset ({', '.join(presets())}) nor a .py file")


def _config_file(path: str, spec: str) -> TrainConfig:
    mod_spec = importlib.util.spec_from_file_location("_mmdit_train_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a user's file: report, do not trace back
        raise MMDiTError(f"--config: {spec} failed to load ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, "get_config", None)):
        raise MMDiTError(f"--config: {spec} defines no get_config()")
    try:
        cfg = module.get_config()
    except MMDiTError as e:  # a section's own check: its message names the field
        raise MMDiTError(f"--config: {spec}: {e}") from None
    if not isinstance(cfg, TrainConfig):
        raise MMDiTError(f"--config: {spec}: get_config() returned {type(cfg).__name__}, not a TrainConfig")
    return cfg


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


def _field_path(cfg, key: str) -> tuple[tuple[str, ...], typing.Any]:
    """The field path `key` names in `cfg` (aliases resolved) and the field's type."""
    path, node, tp = [], cfg, None
    parts = key.split(".")
    while parts:
        head = parts.pop(0)
        if not dataclasses.is_dataclass(node):
            raise MMDiTError(f"--set={key}: {path[-1]!r} has no sub-fields")
        alias = getattr(type(node), "ALIASES", {}).get(head)
        if alias:
            head, *more = alias.split(".")
            parts = more + parts
        fields = {f.name for f in dataclasses.fields(node)}
        if head not in fields:
            raise MMDiTError(f"--set={key}: unknown field {head!r} in {type(node).__name__}; known: "
                             f"{', '.join(fields)}")
        tp = typing.get_type_hints(type(node))[head]
        path.append(head)
        node = getattr(node, head)
    if dataclasses.is_dataclass(node):
        raise MMDiTError(f"--set={key}: {path[-1]!r} is a section; set one of its fields")
    return tuple(path), tp


def _rebuild(node, changes: dict, keys: dict):
    """`node` with `changes` ({field: value or nested changes}) applied, one replace per section, so
    fields checked together (guidance_min <= guidance_max) may be set in any order."""
    kw = {k: _rebuild(getattr(node, k), v, keys[k]) if isinstance(v, dict) and dataclasses.is_dataclass(
        getattr(node, k)) else v for k, v in changes.items()}
    try:
        return dataclasses.replace(node, **kw)
    except MMDiTError as e:
        if str(e).startswith("--set="):
            raise
        raise MMDiTError(f"--set={', '.join(_typed(keys))}: {e}") from None


def _typed(keys: dict) -> list[str]:
    return [k for v in keys.values() for k in (_typed(v) if isinstance(v, dict) else [v])]


def apply_overrides(cfg: TrainConfig, items) -> TrainConfig:
    """`cfg` with each `section.field=value` of `items` set (the value converted to the field's type);
    a later item for the same field wins."""
    changes, keys = {}, {}
    for item in items or ():
        key, eq, text = item.partition("=")
        if not eq:
            raise MMDiTError(f"--set={item}: expected section.field=value")
        key = key.strip()
        path, tp = _field_path(cfg, key)
        value = _convert(text, tp, key)
        c, k = changes, keys
        for p in path[:-1]:
            c, k = c.setdefault(p, {}), k.setdefault(p, {})
        c[path[-1]], k[path[-1]] = value, key
    return _rebuild(cfg, changes, keys) if changes else cfg


def override(cfg, key: str, text: str):
    """`cfg` with the dotted field `key` set from the string `text`."""
    return apply_overrides(cfg, [f"{key}={text}"])


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg: TrainConfig) -> TrainConfig:
    """The checks spanning sections, registries and files (each section checks its own fields); raises
    MMDiTError naming the first bad field (as its --set key)."""
    m, lr, ds = cfg.model, cfg.lora, cfg.distill
    sources = [m.preset is not None, m.diffusers_config is not None, m.pretrained is not None,
               cfg.base.maker is not None]
    need(sum(sources) == 1, "model.preset", "set exactly one of model.preset, model.diffusers_config, "
         "model.pretrained, base.maker", m.preset)
    if cfg.base.maker is not None:
        from mmdit_jax.training import hooks

        need(cfg.base.maker in hooks.base_makers(), "base.maker",
             f"not registered; known: {sorted(hooks.base_makers())}", cfg.base.maker)
        need(cfg.encoders is None, "encoders", "must be unset with base.maker (the base provides them)",
             cfg.encoders)
    if cfg.data_factory is None and cfg.data.kind in ("folder", "arrayrecord"):
        need(bool(cfg.data.path), "data.path", f"data kind {cfg.data.kind!r} needs a path", cfg.data.path)
    if cfg.data_factory is not None:
        from mmdit_jax.training.data import factories

        need(cfg.data_factory in factories(), "data_factory", f"not registered; known: {sorted(factories())}",
             cfg.data_factory)
    if cfg.eval.kind != "none":
        from mmdit_jax.training import hooks

        need(cfg.eval.kind in hooks.evaluators(), "eval.kind", f"'none' or one of {sorted(hooks.evaluators())}",
             cfg.eval.kind)
    if lr.enabled:
        need(m.pretrained is not None, "model.pretrained", "LoRA training adapts a pretrained base: set it",
             m.pretrained)
    if ds.enabled:
        need(not lr.enabled, "distill.enabled", "guidance distillation trains the whole student; "
             "it cannot be combined with lora.enabled", ds.enabled)
        need(ds.teacher is not None or m.pretrained is not None, "distill.teacher",
             "set distill.teacher or model.pretrained (the student starts as the teacher)", ds.teacher)
        if ds.teacher is not None:
            need(paths.exists(ds.teacher), "distill.teacher", "no such file or folder", ds.teacher)
    if cfg.log.sample_every and cfg.encoders is None and m.pretrained is None and cfg.base.maker is None:
        raise MMDiTError("--set=log.sample_every: sample grids need text encoders and a VAE: set encoders "
                         "(a pipeline folder) or model.pretrained")
    return cfg
