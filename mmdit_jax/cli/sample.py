"""`mmdit-sample`: prompts to PNG files through `mj.Pipeline`.

Each PNG's text chunks record everything needed to make it again (prompt, negative prompt, seed, image
index, steps, guidance, size, model, sampler, ...) plus the command line itself. Same seed and settings
give the same image: image i of a run starts from noise drawn with fold_in(key(seed), i).
Bad input prints one line, `mmdit-sample: error: ...`, and exits non-zero.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys

from absl import app, flags

from mmdit_jax.io import paths

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "diffusers pipeline folder (SD3, SD3.5, FLUX.1) or converted folder")
flags.DEFINE_string("prompt", None, "text prompt")
flags.DEFINE_string("negative_prompt", None, "negative prompt (SD3 CFG; FLUX with --true_cfg > 1)")
flags.DEFINE_integer("height", None, "image height in pixels (default: the model's)")
flags.DEFINE_integer("width", None, "image width in pixels (default: the model's)")
flags.DEFINE_integer("steps", None, "denoising steps (default 28, as diffusers)")
flags.DEFINE_float("guidance", None, "CFG scale (SD3) or embedded guidance (FLUX.1-dev); default 7 / 3.5")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("num_images", 1, "images for the prompt, sampled as one batch")
flags.DEFINE_string("out", "samples", "output folder")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "parameter dtype (default: bfloat16 on GPU/TPU, "
                  "float32 on CPU)")
flags.DEFINE_enum("sampler", "euler", ["euler", "dpmpp_2m"], "euler (diffusers) or dpmpp_2m (SD3.5 reference)")
flags.DEFINE_enum("schedule", "diffusers", ["diffusers", "bfl"], "sigma schedule")
flags.DEFINE_integer("max_sequence_length", None, "T5 tokens (default 256 SD3 / 512 FLUX)")
flags.DEFINE_float("true_cfg", 1.0, "FLUX true CFG scale (needs --negative_prompt)")
flags.DEFINE_list("slg_layers", [], "skip-layer guidance layers (SD3.5-Medium: 7,8,9)")
flags.DEFINE_float("slg_scale", 2.8, "skip-layer guidance scale")
flags.DEFINE_float("slg_start", 0.01, "skip-layer guidance start (fraction of steps)")
flags.DEFINE_float("slg_stop", 0.2, "skip-layer guidance stop (fraction of steps)")
flags.DEFINE_string("img2img", None, "input image file: image-to-image from it")
flags.DEFINE_float("strength", 0.6, "img2img strength in [0, 1]")
flags.DEFINE_multi_string("lora", [], "LoRA file (diffusers/PEFT, kohya or ComfyUI keys), optionally :SCALE; "
                          "repeatable: adapters are stacked and merged into the weights")
flags.DEFINE_enum("quantize", None, ["int8", "fp8", "int8:native", "fp8:native"],
                  "store the transformer's block weights as int8 or float8 with per-channel scales (about half "
                  "the memory of bfloat16); :native also rounds activations for the hardware's int8/fp8 matmul")
flags.DEFINE_bool("progress", True, "print per-step progress to stderr")
for _axis, _what in (("data", "data parallel (batch split)"), ("fsdp", "FSDP (parameters and batch split)"),
                     ("tensor", "tensor parallel (heads / MLP split)"),
                     ("sequence", "sequence parallel (tokens split)")):
    flags.DEFINE_integer(f"mesh_{_axis}", None, f"mesh axis size for {_what}; -1 fills. Any --mesh_* flag "
                         "places the transformer by the sharding rules over all devices")

PROG = "mmdit-sample"


def _fail(msg: str, code: int = 1):
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _parse(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0], 2)


def _settings() -> dict:
    """The flags that determine the images, as recorded in each PNG."""
    from mmdit_jax.transformer import default_dtype

    names = ["model", "prompt", "negative_prompt", "height", "width", "steps", "guidance", "seed",
             "num_images", "dtype", "sampler", "schedule", "max_sequence_length", "true_cfg", "slg_layers",
             "slg_scale", "slg_start", "slg_stop", "img2img", "strength", "lora", "quantize"]
    s = {n: FLAGS[n].value for n in names}
    s["dtype"] = s["dtype"] or default_dtype()  # the dtype used, so the record reproduces the pixels
    s["model"] = paths.absolute(s["model"])
    s["lora"] = [_abs_lora(x) for x in s["lora"]]
    if not s["lora"]:
        s.pop("lora")
    if s["quantize"] is None:
        s.pop("quantize")
    if s["img2img"]:
        s["img2img"] = paths.absolute(s["img2img"])
    else:
        s.pop("strength")
    if not s["slg_layers"]:
        for k in ("slg_layers", "slg_scale", "slg_start", "slg_stop"):
            s.pop(k)
    return s


def _parse_lora(spec: str):
    """FILE[:SCALE] -> (file, scale); a suffix that is not a number belongs to the file name."""
    from mmdit_jax.errors import MMDiTError

    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    paths.check_bucket(path, f"--lora={spec}")
    if not paths.isfile(path):
        raise MMDiTError(f"--lora={spec}: no such file {path}")
    return path, scale


def _abs_lora(spec: str) -> str:
    head, sep, tail = spec.rpartition(":")
    try:
        float(tail)
        return paths.absolute(head) + sep + tail if sep and head else paths.absolute(spec)
    except ValueError:
        return paths.absolute(spec)


def _command(s: dict) -> str:
    args = [PROG]
    for k, v in s.items():
        if v is None:
            continue
        if k == "lora":  # repeatable
            args += [f"--lora={x}" for x in v]
            continue
        args.append(f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(shlex.quote(a) for a in args)


def main(argv):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint restore at INFO
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    for name in ("model", "prompt"):
        if not FLAGS[name].value:
            _fail(f"--{name} is required", 2)
    if FLAGS.num_images < 1:
        _fail(f"--num_images must be at least 1, got {FLAGS.num_images}", 2)
    from mmdit_jax.errors import MMDiTError  # the library (and jax) load only once the flags are fine

    try:
        _sample()
    except MMDiTError as e:
        _fail(str(e).splitlines()[0])


def _sample():
    import mmdit_jax as mj
    from mmdit_jax.errors import MMDiTError
    from mmdit_jax.sampling.images import save_png
    from mmdit_jax.sharding import MESH_AXES

    settings = _settings()
    print(f"loading {settings['model']}", flush=True)
    loras = [_parse_lora(x) for x in FLAGS.lora]  # checked before the model loads
    mesh = {a: getattr(FLAGS, f"mesh_{a}") for a in MESH_AXES
            if getattr(FLAGS, f"mesh_{a}") is not None}
    paths.check_bucket(FLAGS.model, "--model")
    paths.check_bucket(FLAGS.out, "--out")
    pipe = mj.Pipeline.from_pretrained(FLAGS.model, dtype=settings["dtype"], mesh=mesh or None,
                                       quantize=FLAGS.quantize)
    if loras:
        pipe.fuse_lora([p for p, _ in loras], [s for _, s in loras])
        print(f"merged {len(loras)} LoRA adapter(s): " + ", ".join(f"{p} x{s:g}" for p, s in loras), flush=True)
    try:
        slg = [int(i) for i in FLAGS.slg_layers]
    except ValueError:
        raise MMDiTError(f"--slg_layers must be integers, got {FLAGS.slg_layers}") from None
    kw = dict(negative_prompt=FLAGS.negative_prompt, height=FLAGS.height, width=FLAGS.width,
              num_inference_steps=FLAGS.steps, guidance_scale=FLAGS.guidance, seed=FLAGS.seed,
              num_images_per_prompt=FLAGS.num_images, max_sequence_length=FLAGS.max_sequence_length,
              output_type="pil", sampler=FLAGS.sampler, schedule=FLAGS.schedule, true_cfg_scale=FLAGS.true_cfg,
              skip_guidance_layers=slg or None, skip_layer_guidance_scale=FLAGS.slg_scale,
              skip_layer_guidance_start=FLAGS.slg_start, skip_layer_guidance_stop=FLAGS.slg_stop,
              progress=FLAGS.progress)
    if FLAGS.img2img:
        from PIL import Image

        try:
            image = Image.open(paths.local(FLAGS.img2img))
            image.load()
        except OSError as e:
            raise MMDiTError(f"{FLAGS.img2img}: cannot read image ({e})") from None
        images = pipe.img2img(image, FLAGS.prompt, strength=FLAGS.strength, **kw)
    else:
        images = pipe(FLAGS.prompt, **kw)
    # resolved defaults go into the record too, so the file alone says what was run
    settings.update(height=images[0].height, width=images[0].width,
                    steps=FLAGS.steps or pipe.defaults.num_inference_steps,
                    guidance=pipe.defaults.guidance_scale if FLAGS.guidance is None else FLAGS.guidance)
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    for i, im in enumerate(images):
        meta = {k: ((" " if k == "lora" else ",").join(map(str, v)) if isinstance(v, list) else v)
                for k, v in settings.items()}
        meta.update(index=i, family=pipe.family, command=_command(settings), software="mmdit-jax")
        path = paths.join(FLAGS.out, f"{tag}_seed{FLAGS.seed}_{i:02d}.png")
        save_png(im, path, meta)
        print(f"wrote {path}", flush=True)


def run():
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
