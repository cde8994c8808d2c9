"""Which linear layers of a model can carry a LoRA, and their names in every file layout.

Derived from the family's checkpoint key plan (`fam.plan(config)`), so LoRA files use exactly the
module names the weights use: a `Target` is one internal Linear (fused, possibly stacked over blocks);
its `slots` are the diffusers modules that share its output axis (to_q / to_k / to_v of a fused qkv,
FLUX's linear1 = to_q, to_k, to_v, proj_mlp), each with its output slice and category.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_of_config
from mmdit_jax.io.rules import kind_of

# FLUX.2: single blocks fuse q, k, v and the MLP input in attn.to_qkv_mlp_proj (counted as attention, as
# q, k and v are FLUX.1's) and the outputs in attn.to_out; feed-forwards are ff.linear_in / linear_out;
# the modulations are shared by all blocks, outside them
_ATTN = re.compile(r"(^|\.)(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out|to_qkv_mlp_proj)$")
_MLP = re.compile(r"(^|\.)(ff|ff_context)\.(net\.(0\.proj|2)|linear_in|linear_out)$|(^|\.)(proj_mlp|proj_out)$"
                  r"|^attn\.to_out$")
_MOD = re.compile(r"(^|\.)(norm1|norm1_context|norm|norm_out)\.linear$"
                  r"|^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear$")


@dataclasses.dataclass(frozen=True)
class Slot:
    start: int
    stop: int
    diffusers: str  # module name inside the block (or top-level name), e.g. "attn.to_q"
    category: str


@dataclasses.dataclass(frozen=True)
class Target:
    key: str  # dotted internal path of the Linear, e.g. "groups.0.blocks.x_block.attn.qkv"
    path: tuple  # the same as a params path (ints for list indices)
    din: int
    dout: int
    blocks: tuple[int, ...] | None  # global block index of each stacked row; None: not stacked
    stack: str | None  # diffusers name of the block stack ("transformer_blocks", ...)
    prefixes: dict  # layout -> key prefix of each row ("" when not stacked)
    original: str  # module name in the original (SAI / BFL) layout, one fused Linear
    slots: tuple[Slot, ...]
    swapped: frozenset  # layouts storing the two output halves swapped (diffusers' norm_out)

    @property
    def rows(self) -> int:
        return len(self.blocks) if self.blocks is not None else 1


def _category(diffusers_module: str, stacked: bool) -> str:
    if _MOD.search(diffusers_module):
        return "mod"
    if not stacked:
        return "embed"  # embedders and the final projection
    if _ATTN.search(diffusers_module):
        return "attn"
    if _MLP.search(diffusers_module):
        return "mlp"
    raise AssertionError(f"uncategorised linear {diffusers_module}")


def _strip(key: str) -> str:
    assert key.endswith(".weight"), key
    return key[:-len(".weight")]


@functools.lru_cache(maxsize=32)
def targets(config) -> tuple[Target, ...]:
    """Every Linear of `config`'s network a LoRA can adapt (conv-stored ones such as SD3's patch
    embedding excluded), in plan order."""
    from mmdit_jax.structure import Structure
    from mmdit_jax.transformer import abstract_module

    fam = family_of_config(config)
    flat = {}

    def walk(tree, prefix=()):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                flat[prefix + (k,)] = v.shape

    walk(Structure(abstract_module(config)).abstract_params())
    out = []
    for e in fam.plan(config):
        r = e.rule
        if e.path[-1] != "kernel" or kind_of(r, "diffusers") != "linear" or kind_of(r, "original") != "linear":
            continue
        shape = flat[e.path]
        per_block = shape[1:] if e.prefixes is not None else shape
        n_in = r.reshaped or 1  # a fused kernel is the (in, out) matrix reshaped (io.rules)
        din, dout = math.prod(per_block[:n_in]), math.prod(per_block[n_in:])
        d_keys = [_strip(k) for k in r.keys["diffusers"]]
        if len(r.keys["original"]) != 1:
            raise AssertionError(f"{e.path}: the original layout is expected to hold one fused Linear")
        sizes = r.parts or (dout // len(d_keys),) * len(d_keys)
        stacked = e.prefixes is not None
        slots, start = [], 0
        for k, n in zip(d_keys, sizes):
            slots.append(Slot(start, start + n, k, _category(k, stacked)))
            start += n
        assert start == dout, (e.path, sizes, dout)
        if stacked:
            blocks, stacks = [], set()
            for p in e.prefixes["diffusers"]:
                m = re.fullmatch(r"(.+)\.(\d+)\.", p)
                stacks.add(m.group(1))
                blocks.append(int(m.group(2)))
            (stack,) = stacks
            prefixes = {lay: tuple(e.prefixes[lay]) for lay in ("diffusers", "original")}
        else:
            blocks, stack, prefixes = None, None, {"diffusers": ("",), "original": ("",)}
        out.append(Target(
            key=".".join(str(p) for p in e.path[:-1]), path=e.path[:-1], din=din, dout=dout,
            blocks=tuple(blocks) if blocks is not None else None, stack=stack, prefixes=prefixes,
            original=_strip(r.keys["original"][0]), slots=tuple(slots), swapped=frozenset(r.swapped_in)))
    return tuple(out)


def target_map(config) -> dict[str, Target]:
    return {t.key: t for t in targets(config)}


@functools.lru_cache(maxsize=32)
def module_index(config) -> dict[str, tuple]:
    """Every accepted spelling of an adapted module's name -> (layout, target key, row, slot index or
    None for the whole fused Linear).

    diffusers / PEFT names (optionally behind "transformer." or "base_model.model.", or as OneTrainer's
    "lora_transformer_" + underscores) and original SAI / BFL names (bare, behind "diffusion_model." /
    "model.diffusion_model.", or kohya's "lora_unet_" + underscores)."""
    index: dict[str, tuple] = {}

    def put(name, value, swapped):
        old = index.setdefault(name, value)
        # a name both layouts share (e.g. "context_embedder") is fine unless the layouts differ in order
        if old != value and (old[1:] != value[1:] or swapped):
            raise AssertionError(f"ambiguous LoRA module name {name}: {old} vs {value}")

    for t in targets(config):
        for row in range(t.rows):
            for s, slot in enumerate(t.slots):
                d = t.prefixes["diffusers"][row] + slot.diffusers
                whole = s if len(t.slots) > 1 else None
                for name in (d, "transformer." + d, "base_model.model." + d,
                             "lora_transformer_" + d.replace(".", "_")):
                    put(name, ("diffusers", t.key, row, whole), t.swapped)
            o = t.prefixes["original"][row] + t.original
            for name in (o, "diffusion_model." + o, "model.diffusion_model." + o,
                         "lora_unet_" + o.replace(".", "_")):
                put(name, ("original", t.key, row, None), t.swapped)
    return index


def check_blocks(config, blocks, stack_name: str):
    """Block indices given by a user exist in the named stack."""
    have = sorted({b for t in targets(config) if t.stack == stack_name for b in t.blocks})
    bad = sorted(set(blocks) - set(have))
    if bad:
        raise MMDiTError(f"LoRA block selection: blocks {bad} not in {stack_name} (has "
                         f"{have[0] if have else '-'}..{have[-1] if have else '-'})")
