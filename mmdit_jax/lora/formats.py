"""LoRA files in the layouts the ecosystem reads and writes (safetensors).

- "diffusers": PEFT keys as `pipe.load_lora_weights` reads them,
  `transformer.<diffusers module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), split q/k/v
  modules (each with its own A); alpha and per-module ranks/alphas in the `lora_adapter_metadata`
  header entry as diffusers writes it (absent: alpha = rank, as diffusers assumes).
- "kohya": `lora_unet_<original module, dots as underscores>.lora_down.weight` / `.lora_up.weight` /
  `.alpha` on the original SAI / BFL modules (fused qkv, FLUX's fused linear1), as sd-scripts writes
  them and ComfyUI and diffusers' FLUX converter read them.
- "comfyui": the same tensors under `diffusion_model.<original module>.`.
Reading also accepts OneTrainer's `lora_transformer_<diffusers module>` names, PEFT keys without the
`transformer.` prefix, and lora_A/lora_B on original names. Names come from the family's key plan
(`targets.module_index`), so every layout the weights load from has its LoRA twin.
"""
from __future__ import annotations

import collections
import json
import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_named, family_of_config
from mmdit_jax.io.safetensors_io import TensorFile, save_file
from mmdit_jax.lora import targets as tg
from mmdit_jax.lora.adapter import LoRA, Part

FORMATS = ("diffusers", "kohya", "comfyui")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the PEFT LoraConfig
_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_down.weight", "A"),
             (".lora_up.weight", "B"), (".alpha", "alpha"))
_UNSUPPORTED_END = (".dora_scale", ".diff", ".diff_b", ".lora_B.bias", ".lora_up.bias")
_UNSUPPORTED_IN = ("lora_magnitude_vector", ".hada_", ".lokr_", ".loha_")
_TEXT = ("text_encoder", "lora_te", "text_encoders.", "te1_", "te2_")


def _swap(b, axis=-1):
    """Exchange the two halves of the output axis (diffusers' (scale, shift) vs (shift, scale))."""
    h = b.shape[axis] // 2
    first, second = np.split(b, [h], axis=axis)
    return np.concatenate([second, first], axis=axis)


def _config_of(model):
    return getattr(model, "config", model)


# ---------------------------------------------------------------- reading

def _peft_metadata(metadata: Mapping | None, origin: str) -> dict | None:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MMDiTError(f"{origin}: unreadable {METADATA_KEY} header entry ({e})") from None
    meta = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    return meta or None


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_alpha(meta: dict | None, module: str, rank: int) -> float:
    """alpha giving PEFT's scale for `module` as alpha / rank."""
    if meta is None:
        return float(rank)  # diffusers: no alphas anywhere means scale 1
    alpha = float(_pattern_value(meta.get("alpha_pattern") or {}, module, meta.get("lora_alpha", 8)))
    if meta.get("use_rslora"):
        alpha = alpha * rank / np.sqrt(rank)  # rsLoRA scales by alpha / sqrt(rank)
    return alpha


def read_lora(tensors: Mapping, model, metadata: Mapping | None = None, origin: str = "LoRA",
              dtype=jnp.float32) -> LoRA:
    """A `LoRA` for `model` (a Transformer or its config) from a LoRA state dict in any layout above."""
    cfg = _config_of(model)
    index, tmap = tg.module_index(cfg), tg.target_map(cfg)
    meta = _peft_metadata(metadata, origin)
    groups: dict[str, dict] = collections.defaultdict(dict)
    bad, text, unknown = [], [], []
    for k in tensors:
        if k.endswith(_UNSUPPORTED_END) or any(u in k for u in _UNSUPPORTED_IN):
            bad.append(k)
            continue
        for suffix, kind in _SUFFIXES:
            if k.endswith(suffix):
                groups[k[:-len(suffix)]][kind] = k
                break
        else:
            unknown.append(k)
    if bad:
        raise MMDiTError(f"{origin}: DoRA / LoHa / LoKr / bias or norm-difference tensors are not "
                         f"supported: {', '.join(sorted(bad)[:5])}")
    entries: dict[tuple, dict] = collections.defaultdict(dict)
    for module, g in sorted(groups.items()):
        hit = index.get(module)
        if hit is None:
            (text if module.startswith(_TEXT) else unknown).append(module)
            continue
        if "A" not in g or "B" not in g:
            raise MMDiTError(f"{origin}: LoRA module {module} lacks its "
                             f"{'down/A' if 'A' not in g else 'up/B'} weight")
        layout, key, row, slot = hit
        t = tmap[key]
        start, stop = (t.slots[slot].start, t.slots[slot].stop) if slot is not None else (0, t.dout)
        a, b = np.asarray(tensors[g["A"]]), np.asarray(tensors[g["B"]])
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != t.din or b.shape != (stop - start, a.shape[0]):
            raise MMDiTError(f"{origin}: LoRA module {module}: down/A {a.shape} and up/B {b.shape} do "
                             f"not fit a Linear of {t.din} -> {stop - start} (expected (r, {t.din}) and "
                             f"({stop - start}, r))")
        rank = a.shape[0]
        if "alpha" in g:
            alpha = float(np.asarray(tensors[g["alpha"]], np.float64).reshape(-1)[0])
        else:
            canonical = t.prefixes["diffusers"][row] + t.slots[slot if slot is not None else 0].diffusers
            alpha = _peft_alpha(meta, canonical, rank)
        a_int, b_int = a.T, b.T  # (in, r), (r, out)
        if layout in t.swapped:
            b_int = _swap(b_int)
        if row in entries[(key, start, stop)]:
            raise MMDiTError(f"{origin}: LoRA module {module} appears twice (under two spellings)")
        entries[(key, start, stop)][row] = (a_int, b_int, alpha)
    if text:
        raise MMDiTError(f"{origin}: text-encoder LoRA modules are not supported (transformer only): "
                         f"{', '.join(text[:5])}")
    if unknown:
        raise MMDiTError(f"{origin}: LoRA keys that match no layer of this {cfg.family} model "
                         f"({len(unknown)}): {', '.join(sorted(unknown)[:8])}")
    if not entries:
        raise MMDiTError(f"{origin}: no LoRA tensors found")
    weights, parts = {}, {}
    for (key, start, stop), by_row in sorted(entries.items()):
        t = tmap[key]
        rows = sorted(by_row)
        r_max = max(by_row[r][0].shape[1] for r in rows)
        pad = lambda x, axis: np.pad(x, [(0, r_max - x.shape[axis]) if i == axis else (0, 0)
                                         for i in range(x.ndim)])
        a = np.stack([pad(by_row[r][0], 1) for r in rows])
        b = np.stack([pad(by_row[r][1], 0) for r in rows])
        ranks = tuple(by_row[r][0].shape[1] for r in rows)
        alphas = tuple(by_row[r][2] for r in rows)
        if t.blocks is None:
            a, b = a[0], b[0]
        part = Part(start, stop, tuple(rows) if t.blocks is not None else None, ranks, alphas)
        weights.setdefault(key, {})[part.name] = {"A": a, "B": b}
        parts.setdefault(key, {})[part.name] = part
    weights, parts = _fuse_shared_a(weights, parts)
    weights = {k: {n: {x: jnp.asarray(v.astype(np.dtype(dtype))) for x, v in w.items()}
                   for n, w in d.items()} for k, d in weights.items()}
    return LoRA(weights, parts, cfg.family)


def _fuse_shared_a(weights, parts):
    """Adjacent parts of one Linear with bit-identical A, rows, ranks and alphas become one part (B
    side by side): a fused-qkv adapter saved as split diffusers modules reads back as it was."""
    for key in list(parts):
        order = sorted(parts[key].values(), key=lambda p: p.start)
        merged = [(order[0], dict(weights[key][order[0].name]))]
        for p in order[1:]:
            q, wq = merged[-1]
            wp = weights[key][p.name]
            if (q.stop == p.start and (q.rows, q.ranks, q.alphas) == (p.rows, p.ranks, p.alphas)
                    and np.array_equal(wq["A"], wp["A"])):
                fused = Part(q.start, p.stop, q.rows, q.ranks, q.alphas)
                merged[-1] = (fused, {"A": wq["A"], "B": np.concatenate([wq["B"], wp["B"]], -1)})
            else:
                merged.append((p, dict(wp)))
        parts[key] = {p.name: p for p, _ in merged}
        weights[key] = {p.name: w for p, w in merged}
    return weights, parts


def load_lora(path, model, dtype="float32") -> LoRA:
    """A LoRA .safetensors file (any layout above) for `model` (a Transformer or its config)."""
    from mmdit_jax.dtypes import parse_dtype

    f = TensorFile(str(path))
    return read_lora(f, model, f.metadata, origin=str(path), dtype=parse_dtype(dtype))


# ---------------------------------------------------------------- writing

def _rows_of(part: Part):
    return part.rows if part.rows is not None else (0,)


def _row_factors(part: Part, w, i: int):
    """Row i of a part trimmed to its true rank: A (in, r), B (r, n) as float numpy."""
    a, b = np.asarray(w["A"]), np.asarray(w["B"])
    if part.rows is not None:
        a, b = a[i], b[i]
    r = part.ranks[i]
    return a[:, :r], b[:r]


def _diffusers_tensors(lora: LoRA, cfg):
    tmap = tg.target_map(cfg)
    tensors, ranks, alphas = {}, {}, {}
    for key, part, w in lora.items():
        t = tmap[key]
        for i, row in enumerate(_rows_of(part)):
            a, b = _row_factors(part, w, i)
            full = np.zeros((b.shape[0], t.dout), b.dtype)
            full[:, part.start:part.stop] = b
            cover = np.zeros(t.dout, bool)
            cover[part.start:part.stop] = True
            if "diffusers" in t.swapped:
                full, cover = _swap(full), _swap(cover, 0)
            for slot in t.slots:
                if not cover[slot.start:slot.stop].any():
                    continue
                module = t.prefixes["diffusers"][row] + slot.diffusers
                if module in ranks:
                    raise MMDiTError(f"LoRA: two parts adapt {module}; merge them before saving in the "
                                     "diffusers layout")
                tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
                tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(
                    full[:, slot.start:slot.stop].T)
                ranks[module], alphas[module] = a.shape[1], part.alphas[i]
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    pattern = lambda m: "^" + re.escape(m)
    meta = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {pattern(m): v for m, v in sorted(ranks.items()) if v != r},
            "alpha_pattern": {pattern(m): v for m, v in sorted(alphas.items()) if v != alpha}}
    header = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in meta.items()},
                                                        indent=2, sort_keys=True)}
    return tensors, header


def _original_tensors(lora: LoRA, cfg, style: str):
    """One fused module per original Linear and row; several parts stack on the rank axis with B
    block-wise (exact); their scales are unified through alpha (folded into B if they differ)."""
    tmap = tg.target_map(cfg)
    tensors = {}
    by_target = collections.defaultdict(list)
    for key, part, w in lora.items():
        by_target[key].append((part, w))
    for key, plist in sorted(by_target.items()):
        t = tmap[key]
        for row in sorted({r for p, _ in plist for r in _rows_of(p)}):
            aa, bb, ss = [], [], []
            for p, w in plist:
                if row not in _rows_of(p):
                    continue
                i = _rows_of(p).index(row)
                a, b = _row_factors(p, w, i)
                full = np.zeros((b.shape[0], t.dout), b.dtype)
                full[:, p.start:p.stop] = b
                aa.append(a)
                bb.append(full)
                ss.append((p.alphas[i], p.ranks[i]))
            rank = sum(a.shape[1] for a in aa)
            if len(aa) == 1:
                alpha = ss[0][0]
            else:
                s_ref = ss[0][0] / ss[0][1]
                bb = [b if al / r == s_ref else b * np.asarray(al / r / s_ref, b.dtype)
                      for b, (al, r) in zip(bb, ss)]
                alpha = s_ref * rank
            a, b = np.concatenate(aa, 1), np.concatenate(bb, 0)
            if "original" in t.swapped:
                b = _swap(b)
            name = t.prefixes["original"][row] + t.original
            name = "lora_unet_" + name.replace(".", "_") if style == "kohya" else "diffusion_model." + name
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(b.T)
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return tensors, {"format": "pt"}


def lora_tensors(lora: LoRA, model, format: str = "diffusers"):
    """(tensors, safetensors header metadata) of `lora` in `format` ("diffusers", "kohya", "comfyui")."""
    cfg = _config_of(model)
    if format not in FORMATS:
        raise MMDiTError(f"LoRA format {format!r}: expected one of {FORMATS}")
    if family_named(lora.family) is not family_of_config(cfg):
        raise MMDiTError(f"a {lora.family} LoRA cannot be written for a {cfg.family} model")
    if format == "diffusers":
        return _diffusers_tensors(lora, cfg)
    return _original_tensors(lora, cfg, format)


def save_lora(lora: LoRA, path, model, format: str = "diffusers"):
    """Write `lora` to `path` (.safetensors) in `format`, atomically (a partial file never remains)."""
    tensors, header = lora_tensors(lora, model, format)
    save_file(tensors, str(path), metadata=header)
