"""LoRA adapters held apart from the base params: config, in-memory form, initialisation.

In memory a `LoRA` is a pytree whose only leaves are the trainable factors, so `optax` state,
gradients and checkpoints hold the adapter and nothing else:

    lora.weights[target key][part name] = {"A": (K, in, r), "B": (K, r, n)}   # stacked target
                                          {"A": (in, r),    "B": (r, n)}      # single Linear

The static part (`lora.parts`, a `Part` per weight) says which output columns [start, stop) of the
target's kernel the part adapts (a fused qkv kernel may carry one fused part or three split ones,
as kohya and diffusers files do), which stacked rows (blocks) it has (K of them), and each row's
rank and alpha. The update of a kernel is  sum over parts of  (alpha/rank) * A @ B  placed in its
columns; ranks that differ between rows are zero-padded to the largest.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.lora import targets as tg

PRESETS = {"attn": ("attn",), "attn_mlp": ("attn", "mlp"), "all": ("attn", "mlp", "mod")}
INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """targets: "attn" (q/k/v/out of both streams, MMDiT-X attn2, FLUX single blocks' q/k/v),
    "attn_mlp" (+ MLPs, FLUX single blocks' MLP input and linear2), "all" (+ every adaLN modulation).
    embedders: also the time/text/guidance embedders, the context/patch embedders and the final
    projection. blocks: SD3 joint or FLUX double block indices to adapt (None: all); single_blocks:
    FLUX single-stream blocks (None: all). alpha None means alpha = rank (scale 1)."""
    targets: str = "attn"
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    embedders: bool = False
    blocks: tuple[int, ...] | None = None
    single_blocks: tuple[int, ...] | None = None
    init: str = "kaiming"  # A ~ U(+-1/sqrt(in)) as PEFT's default, or "gaussian" N(0, 1/rank^2)

    def __post_init__(self):
        if self.targets not in PRESETS:
            raise MMDiTError(f"LoRA targets {self.targets!r}: expected one of {sorted(PRESETS)}")
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise MMDiTError(f"LoRA rank {self.rank!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise MMDiTError(f"LoRA dropout {self.dropout!r} must be in [0, 1)")
        if self.init not in INITS:
            raise MMDiTError(f"LoRA init {self.init!r}: expected one of {INITS}")
        for name in ("blocks", "single_blocks"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(sorted({int(b) for b in v})))

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclasses.dataclass(frozen=True)
class Part:
    start: int
    stop: int
    rows: tuple[int, ...] | None  # stacked rows adapted (internal row order); None: not stacked
    ranks: tuple[int, ...]  # true rank per adapted row
    alphas: tuple[float, ...]  # alpha per adapted row

    @property
    def name(self) -> str:
        return f"{self.start}:{self.stop}"

    def scales(self, width: int) -> np.ndarray:
        """(K, width) float32: alpha/rank on each row's first `rank` columns, 0 on the padding."""
        out = np.zeros((len(self.ranks), width), np.float32)
        for i, (r, a) in enumerate(zip(self.ranks, self.alphas)):
            out[i, :r] = a / r
        return out


@jax.tree_util.register_pytree_node_class
class LoRA:
    def __init__(self, weights: dict, parts: dict, family: str):
        self.weights = weights
        self.parts = parts
        self.family = family

    def tree_flatten(self):
        aux = (tuple((k, tuple(sorted(v.items()))) for k, v in sorted(self.parts.items())), self.family)
        return (self.weights,), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        parts, family = aux
        return cls(children[0], {k: dict(v) for k, v in parts}, family)

    def num_params(self) -> int:
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(self.weights)))

    def items(self):
        """(target key, Part, {"A", "B"}) for every part."""
        for key in sorted(self.parts):
            for name, part in sorted(self.parts[key].items()):
                yield key, part, self.weights[key][name]

    def __repr__(self):
        return (f"LoRA({self.family}, {len(self.parts)} targets, "
                f"{sum(len(v) for v in self.parts.values())} parts, {self.num_params()} params)")


def _runs(slots):
    """Contiguous runs of slots -> (start, stop)."""
    runs = []
    for s in slots:
        if runs and runs[-1][1] == s.start:
            runs[-1][1] = s.stop
        else:
            runs.append([s.start, s.stop])
    return [tuple(r) for r in runs]


def init_lora(model_config, cfg: LoraConfig, seed: int = 0, dtype=jnp.float32) -> LoRA:
    """Fresh adapters for `model_config`'s network: A random, B zero (so the model is unchanged).

    A fused Linear gets one part per contiguous run of selected slots (one A for a whole qkv; FLUX's
    linear1 gets q/k/v under "attn", all of it under "attn_mlp")."""
    stacks = {t.stack for t in tg.targets(model_config) if t.stack}
    sel_of = {"transformer_blocks": cfg.blocks, "single_transformer_blocks": cfg.single_blocks}
    if cfg.single_blocks is not None and "single_transformer_blocks" not in stacks:
        raise MMDiTError("LoRA single_blocks given, but this model has no single-stream blocks")
    for stack, sel in sel_of.items():
        if sel is not None and stack in stacks:
            tg.check_blocks(model_config, sel, stack)
    cats = PRESETS[cfg.targets] + (("embed",) if cfg.embedders else ())
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    key = jax.random.key(seed)
    weights, parts = {}, {}
    for i, t in enumerate(tg.targets(model_config)):
        slots = [s for s in t.slots if s.category in cats]
        if not slots:
            continue
        if t.blocks is None:
            rows = None
        else:
            sel = sel_of[t.stack]
            rows = tuple(j for j, b in enumerate(t.blocks) if sel is None or b in sel)
            if not rows:
                continue
        k = len(rows) if rows is not None else 1
        lead = (k,) if rows is not None else ()
        for j, (start, stop) in enumerate(_runs(slots)):
            sub = jax.random.fold_in(jax.random.fold_in(key, i), j)
            shape = lead + (t.din, cfg.rank)
            if cfg.init == "kaiming":  # kaiming_uniform(a=sqrt(5)) on (r, in): bound 1/sqrt(in)
                bound = 1.0 / math.sqrt(t.din)
                a = jax.random.uniform(sub, shape, jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(sub, shape, jnp.float32) / cfg.rank
            part = Part(start, stop, rows, (cfg.rank,) * k, (alpha,) * k)
            weights.setdefault(t.key, {})[part.name] = {
                "A": a.astype(dtype), "B": jnp.zeros(lead + (cfg.rank, stop - start), dtype)}
            parts.setdefault(t.key, {})[part.name] = part
    if not parts:
        raise MMDiTError(f"LoRA config {cfg} selects no layer of this model")
    return LoRA(weights, parts, model_config.family)
