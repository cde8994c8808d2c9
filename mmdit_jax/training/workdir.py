"""The workdir as a pipeline folder: model_index.json (the base pipeline's, with any sampling defaults it
sets), the base's scheduler / tokenizers / VAE / text encoders (symlinked), and transformer/{config.json,
checkpoint.json}, the latter pointing at the newest checkpoint's EMA (or params), so `mmdit-sample
--model=WORKDIR` and every loader read it. Links into the workdir itself (a base written to WORKDIR/base) and the checkpoint
pointer are relative: a moved or copied workdir is still a pipeline folder.
"""
from __future__ import annotations

from mmdit_jax.families import family_of_config
from mmdit_jax.io import paths
from mmdit_jax.io.files import link, write_json


def prepare_workdir(workdir: str, network_config, encoders: str | None, use_ema: bool,
                    base_transformer: str | None = None) -> None:
    """base_transformer (LoRA runs): the frozen base's path; WORKDIR/transformer then links to its
    transformer (the adapters are in WORKDIR/lora/), so the workdir samples as the base does. On a
    bucket the links are JSON pointer files (see io.files.link)."""
    paths.makedirs(workdir)
    cfg = network_config.to_diffusers()
    base_index = paths.join(encoders, "model_index.json") if encoders else None
    if base_index and paths.isfile(base_index):
        index = paths.read_json(base_index)
        for name in index:
            src = paths.join(encoders, name)
            dst = paths.join(workdir, name)
            if name.startswith("_") or name == "transformer" or not paths.isdir(src):
                continue
            link(src, dst, workdir)
    else:
        index = {"_class_name": family_of_config(network_config).pipelines.text_to_image}
    index["transformer"] = ["diffusers", cfg["_class_name"]]
    write_json(paths.join(workdir, "model_index.json"), index)
    comp = paths.join(workdir, "transformer")
    if base_transformer is not None:
        src = paths.join(base_transformer, "transformer")
        src = src if paths.isdir(src) else base_transformer
        if paths.isdir(src):
            link(src, comp, workdir)
        return
    paths.makedirs(comp)
    write_json(paths.join(comp, "config.json"), cfg)
    write_json(paths.join(comp, "checkpoint.json"),
                    {"directory": "../checkpoints", "item": "ema" if use_ema else "params"})
