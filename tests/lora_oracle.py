"""Test-side LoRA helpers: tiny diffusers models with their loaded twins, random adapters, diffusers
pipelines that load LoRA files, and ComfyUI's merge rule written out independently of mmdit_jax."""
import jax
import numpy as np

from mmdit_jax import lora as L

SD3_KW = dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,))  # QK-norm, a dual layer


def randomize(lora, seed=0, std=0.1):
    """Every factor random (B non-zero), keeping zero the padding beyond each row's true rank."""
    leaves, tree = jax.tree.flatten(lora)
    r = np.random.default_rng(seed)
    out = jax.tree.unflatten(tree, [np.asarray(x) + std * r.standard_normal(x.shape).astype(np.float32)
                                    for x in leaves])
    for key, part, w in out.items():
        for i, rank in enumerate(part.ranks):
            a, b = (w["A"][i], w["B"][i]) if part.rows is not None else (w["A"], w["B"])
            a[..., rank:] = 0
            b[rank:] = 0
    return jax.tree.map(np.asarray, out)


def drop(lora, pred):
    """`lora` without the targets whose key satisfies pred."""
    keep = [k for k in lora.parts if not pred(k)]
    return L.LoRA({k: lora.weights[k] for k in keep}, {k: lora.parts[k] for k in keep}, lora.family)


def sd3_pipeline(transformer):
    """An SD3 pipeline holding only the transformer: enough for `load_lora_weights`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                          "text_encoder_3", "tokenizer_3"])
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    **none)


def flux_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **none)


def comfyui_merge(state_dict: dict, lora_tensors: dict, prefix: str = "") -> dict:
    """ComfyUI's rule for kohya-style files on an original-layout state dict (torch tensors, keys
    behind `prefix`): module names are "lora_unet_" + the weight key with dots as underscores, or the
    key itself behind "diffusion_model."; W += (alpha / rank) * up @ down (alpha defaults to rank)."""
    import torch

    out = {k: v.clone().double() for k, v in state_dict.items()}
    names = {}
    for k in state_dict:
        if k.endswith(".weight"):
            bare = k[len(prefix):-len(".weight")]
            names["lora_unet_" + bare.replace(".", "_")] = k
            names["diffusion_model." + bare] = k
    modules = {k[:-len(".lora_down.weight")] for k in lora_tensors if k.endswith(".lora_down.weight")}
    assert len(modules) * 3 == len(lora_tensors), "expected down, up and alpha for every module"
    for m in modules:
        down = torch.from_numpy(np.array(lora_tensors[m + ".lora_down.weight"])).double()
        up = torch.from_numpy(np.array(lora_tensors[m + ".lora_up.weight"])).double()
        alpha = float(np.asarray(lora_tensors[m + ".alpha"]))
        out[names[m]] += alpha / down.shape[0] * (up @ down)
    return {k: v.float() for k, v in out.items()}


def vary_ranks(lora):
    """Ranks and alphas that differ between modules: row i of the n-th part drops (i + n) % rank ranks
    and gets alpha + (i + n) / 4, so per-module rank and alpha handling is exercised."""
    import dataclasses

    parts, weights = {}, {}
    for n, (key, part, w) in enumerate(lora.items()):
        a, b = np.array(w["A"]), np.array(w["B"])
        rows = range(len(part.ranks))
        ranks = tuple(part.ranks[i] - (i + n) % part.ranks[i] for i in rows)
        alphas = tuple(part.alphas[i] + (i + n) / 4 for i in rows)
        for i, r in enumerate(ranks):
            if part.rows is not None:
                a[i, :, r:] = 0
                b[i, r:] = 0
            else:
                a[:, r:] = 0
                b[r:] = 0
        part = dataclasses.replace(part, ranks=ranks, alphas=alphas)
        a, b = a[..., :max(ranks)], b[..., :max(ranks), :]  # padded only up to the largest rank
        parts.setdefault(key, {})[part.name] = part
        weights.setdefault(key, {})[part.name] = {"A": a, "B": b}
    return L.LoRA(weights, parts, lora.family)
