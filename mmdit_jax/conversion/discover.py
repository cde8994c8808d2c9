"""Every component a source holds, resolved through the same functions the loaders use.

Sources: a diffusers pipeline folder (or one written by mmdit-convert, or a training workdir), a
component folder (transformer / AutoencoderKL / CLIP / T5), or a single file (SAI SD3 / SD3.5 with or
without a bundled VAE and text encoders, BFL FLUX, ComfyUI-prefixed, a bare VAE or text tower;
pickles only through torch's weights_only loader). Nothing but headers and configs is read here.
"""
from __future__ import annotations

import dataclasses
import os

from mmdit_jax.conversion.pipelines import default_scheduler
from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import families, family_of_config, family_of_pipeline
from mmdit_jax.io import paths
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.sources import open_tensors, read_json

@dataclasses.dataclass
class Job:
    name: str  # subfolder in a pipeline ("transformer", "vae", "text_encoder_2", "tokenizer", ...)
    kind: str  # "transformer" | "vae" | "clip" | "t5" | "files"
    weights: ComponentWeights | None = None
    config_json: dict | None = None  # config.json of a model component
    cls: str | None = None  # class name for model_index.json
    copy_from: str | None = None  # "files": the folder copied as is
    files: dict | None = None  # "files": {file name: json content} written instead

    @property
    def layout(self) -> str:
        """The key layout of this component's diffusers-style export."""
        return "transformers" if self.kind in ("clip", "t5") else "diffusers"


@dataclasses.dataclass
class Found:
    origin: str
    jobs: list[Job]
    pipeline: str | None  # pipeline class; None: one component written as a component folder
    family: str | None = None  # the family's name when a transformer (or the pipeline) says so
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def models(self) -> list[Job]:
        return [j for j in self.jobs if j.kind != "files"]


def _entry_class(entry) -> str | None:
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return str(entry[1])


def _text_job(name: str, cls: str, path: str, dtype, subfolder: str | None) -> Job:
    from mmdit_jax.text.weights import clip_weights, t5_weights

    if cls.startswith("T5"):
        w = t5_weights(path, dtype, subfolder=subfolder or "text_encoder")
        kind = "t5"
    elif cls.startswith("CLIPText"):
        w = clip_weights(path, dtype, subfolder=subfolder or "text_encoder")
        kind = "clip"
    else:
        raise MMDiTError(f"{path}: text encoder class {cls!r} not supported (CLIPTextModel*, T5EncoderModel)")
    return Job(name, kind, w, _config_of(w.origin), cls)


def _config_of(folder: str) -> dict | None:
    cfg = os.path.join(folder, "config.json")
    return read_json(cfg) if os.path.isdir(folder) and os.path.isfile(cfg) else None


def _pipeline(path: str, dtype, tokenizers: str | None) -> Found:
    from mmdit_jax.conversion.pipelines import COMPONENTS
    from mmdit_jax.transformer import transformer_weights
    from mmdit_jax.vae import loader

    index = read_json(os.path.join(path, "model_index.json"))
    pipeline = str(index.get("_class_name", ""))
    if pipeline not in COMPONENTS:
        raise MMDiTError(f"{path}/model_index.json: unsupported pipeline class {pipeline!r} "
                         f"(expected {' or '.join(COMPONENTS)})")
    found = Found(path, [], pipeline, family_of_pipeline(pipeline, f"{path}/model_index.json").name)
    for name, entry in index.items():
        cls = _entry_class(entry)
        if name.startswith("_") or cls is None:
            continue
        if name == "transformer":
            w = transformer_weights(path, dtype)
            found.family = w.config.family
            found.jobs.append(Job(name, "transformer", w, _config_of(w.origin) or w.config.to_diffusers(), cls))
        elif name == "vae":
            w = loader.vae_weights(path, dtype)
            found.jobs.append(Job(name, "vae", w, _config_of(w.origin) or w.config.to_diffusers(), cls))
        elif name.startswith("text_encoder"):
            found.jobs.append(_text_job(name, cls, path, dtype, name))
        elif name.startswith(("tokenizer", "scheduler")):
            folder = os.path.join(path, name)
            if not os.path.isdir(folder):
                raise MMDiTError(f"{path}: model_index.json lists {name} but there is no {name}/ folder")
            found.jobs.append(Job(name, "files", cls=cls, copy_from=folder))
        else:
            raise MMDiTError(f"{path}: component {name!r} ({cls}) is not supported")
    if tokenizers:
        _add_tokenizers(found, tokenizers)
    return found


def _component(path: str, dtype) -> Found:
    from mmdit_jax.transformer import transformer_weights
    from mmdit_jax.vae import loader

    cfg = read_json(os.path.join(path, "config.json"))
    cls = cfg.get("_class_name")
    arch = (cfg.get("architectures") or [None])[0]
    transformer_classes = [f.diffusers_class for f in families().values()]
    if cls in transformer_classes:
        w = transformer_weights(path, dtype)
        job = Job("transformer", "transformer", w, cfg, cls)
        return Found(path, [job], family_of_config(w.config).pipelines.for_config(w.config), w.config.family)
    if cls == "AutoencoderKL":
        w = loader.vae_weights(path, dtype)
        return Found(path, [Job("vae", "vae", w, cfg, cls)], None)
    if arch or cfg.get("model_type") in ("clip_text_model", "t5"):
        name = arch or ("T5EncoderModel" if cfg.get("model_type") == "t5" else "CLIPTextModel")
        return Found(path, [_text_job("text_encoder", name, path, dtype, None)], None)
    raise MMDiTError(f"{path}/config.json: unsupported component class {cls or arch!r} (expected "
                     f"{', '.join(transformer_classes)}, AutoencoderKL, CLIPTextModel* or T5EncoderModel)")


def _single_file(path: str, dtype, tokenizers: str | None) -> Found:
    from mmdit_jax.families import detect
    from mmdit_jax.text.weights import BUNDLES, clip_config_to_json, clip_weights, t5_config_to_json, t5_weights
    from mmdit_jax.transformer import transformer_weights
    from mmdit_jax.vae import loader
    from mmdit_jax.vae.weights import detect_single_file

    tensors = open_tensors(path)
    try:
        detect(tensors, None, path)
        has_transformer = True
    except MMDiTError:
        has_transformer = False
    try:
        vae_prefix, _ = detect_single_file(tensors)
        has_vae = True
    except MMDiTError:
        has_vae = False
    bundles = [b for b, pre in BUNDLES.items() if any(k.startswith(pre) for k in tensors)]

    if not has_transformer:
        if has_vae and not bundles:
            w = loader.vae_weights(path, dtype)
            return Found(path, [Job("vae", "vae", w, w.config.to_diffusers(), "AutoencoderKL")], None)
        if not has_vae and not bundles:
            for kind, fn, to_json, cls in (("clip", clip_weights, clip_config_to_json, None),
                                           ("t5", t5_weights, t5_config_to_json, "T5EncoderModel")):
                try:
                    w = fn(path, dtype)
                except MMDiTError:
                    continue
                js = to_json(w.config)
                return Found(path, [Job("text_encoder", kind, w, js, cls or js["architectures"][0])], None)
        raise MMDiTError(f"{path}: no SD3 or FLUX transformer found (keys in diffusers, SAI/BFL or "
                         f"ComfyUI layout), so the pipeline family can not be told; first keys: "
                         f"{', '.join(list(tensors)[:5])}")

    t = transformer_weights(path, dtype)
    fam = family_of_config(t.config)
    found = Found(path, [Job("transformer", "transformer", t, t.config.to_diffusers(), fam.diffusers_class)],
                  fam.pipelines.for_config(t.config), fam.name)
    if has_vae:
        v = loader.vae_weights(path, dtype, family=fam.name)
        found.jobs.append(Job("vae", "vae", v, v.config.to_diffusers(), "AutoencoderKL"))
    for bundle in bundles:
        name = fam.text.bundled_folders.get(bundle)
        if name is None:
            raise MMDiTError(f"{path}: a {bundle} text encoder is not part of a {fam.name} pipeline")
        if bundle == "t5xxl":
            w = t5_weights(path, dtype, prefix=bundle)
            found.jobs.append(Job(name, "t5", w, t5_config_to_json(w.config), "T5EncoderModel"))
        else:
            # a family conditioning on CLIP-L's projected output (SD3) gets an identity projection, as in
            # diffusers: its files keep none
            w = clip_weights(path, dtype, prefix=bundle, identity_projection=fam.text.identity_projection)
            js = clip_config_to_json(w.config)
            found.jobs.append(Job(name, "clip", w, js, js["architectures"][0]))
    found.jobs.append(Job("scheduler", "files", cls="FlowMatchEulerDiscreteScheduler",
                          files={"scheduler_config.json": default_scheduler(t.config)}))
    found.notes.append("scheduler: the released default for this family (single files carry none)")
    if tokenizers:
        _add_tokenizers(found, tokenizers)
    elif bundles:
        found.notes.append("tokenizers: none (single files carry none; pass --tokenizers=PIPELINE_FOLDER "
                           "to copy them, load_text_encoders needs them)")
    return found


def _add_tokenizers(found: Found, folder: str) -> None:
    """Copy tokenizer*/ of another pipeline folder for the text encoders this source has."""
    from mmdit_jax.conversion.pipelines import COMPONENTS

    have = {j.name for j in found.jobs}
    index = read_json(os.path.join(folder, "model_index.json")) \
        if os.path.isfile(os.path.join(folder, "model_index.json")) else {}
    for enc in [j.name for j in found.jobs if j.kind in ("clip", "t5")]:
        tok = enc.replace("text_encoder", "tokenizer")
        if tok in have:
            continue
        src = os.path.join(folder, tok)
        if not os.path.isdir(src):
            raise MMDiTError(f"{folder}: no {tok}/ tokenizer folder (needed for {enc})")
        cls = _entry_class(index.get(tok)) or COMPONENTS[found.pipeline][tok][1]
        found.jobs.append(Job(tok, "files", cls=cls, copy_from=src))


def discover(path, dtype="float32", tokenizers: str | None = None) -> Found:
    path = _local(path)
    tokenizers = None if tokenizers is None else _local(tokenizers)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return _pipeline(path, dtype, tokenizers)
        if os.path.isfile(os.path.join(path, "config.json")):
            return _component(path, dtype)
        raise MMDiTError(f"{path}: not a diffusers pipeline or component folder (no model_index.json or "
                         "config.json)")
    if os.path.isfile(path):
        return _single_file(path, dtype, tokenizers)
    raise MMDiTError(f"{path}: no such file or folder")


def _local(path) -> str:
    """A bucket source's local copy (Orbax params stay in the bucket: they are restored from there)."""
    path = paths.absolute(path)
    if not paths.is_remote(path):
        return path
    paths.check_bucket(path, "--src")
    return paths.local_folder(path) if paths.isdir(path) else paths.local_file(path)
