"""`mmdit-convert`: PyTorch checkpoints -> Orbax folder, and back to safetensors with --to.

  mmdit-convert --src=PATH --out=DIR [--dtype=float32|bfloat16] [--tokenizers=PIPELINE_FOLDER]
  mmdit-convert --to=diffusers|original --src=CONVERTED_OR_TRAINED --out=DIR [--dtype=...]

Bad input prints one line `mmdit-convert: <problem>` to stderr and exits 1; nothing is left at --out.
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Source: diffusers pipeline/component folder, single checkpoint file, "
                    "or (with --to) a folder written by mmdit-convert or a training workdir.")
flags.DEFINE_string("out", None, "Output folder (must not exist; written aside and renamed when complete).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (conversion default float32; "
                  "export default: the dtypes saved).")
flags.DEFINE_enum("to", None, ["diffusers", "original"], "Export to safetensors in this layout instead of "
                  "converting to Orbax.")
flags.DEFINE_string("tokenizers", None, "A pipeline folder whose tokenizer*/ folders are copied (single-file "
                    "sources carry no tokenizers).")
flags.DEFINE_integer("max_shard_mb", 10_000, "Diffusers export: largest safetensors shard, in MB.")


def _fail(msg: str) -> None:
    print(f"mmdit-convert: {msg}", file=sys.stderr)
    sys.exit(1)


def main(argv) -> None:
    from absl import logging

    from mmdit_jax.errors import MMDiTError

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines say enough

    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.src or not FLAGS.out:
        _fail("--src and --out are required (see --help)")
    if FLAGS.max_shard_mb <= 0:
        _fail(f"--max_shard_mb must be positive, got {FLAGS.max_shard_mb}")
    try:
        if FLAGS.to:
            from mmdit_jax.conversion.export import export

            res = export(FLAGS.src, FLAGS.out, FLAGS.to, FLAGS.dtype, tokenizers=FLAGS.tokenizers,
                         max_shard_bytes=FLAGS.max_shard_mb * 10**6)
            print(f"mmdit-convert: wrote {FLAGS.to} layout to {res['out']} ({', '.join(res['written'])})")
        else:
            from mmdit_jax.conversion.to_orbax import convert

            res = convert(FLAGS.src, FLAGS.out, FLAGS.dtype or "float32", FLAGS.tokenizers)
            print(f"mmdit-convert: wrote {FLAGS.out} ({', '.join(res['components'])}) in {res['seconds']} s")
        for note in res["notes"]:
            print(f"mmdit-convert: note: {note}")
    except MMDiTError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # disk full, permissions: name the path, no traceback
        _fail(f"{getattr(e, 'filename', None) or FLAGS.out}: {e.strerror or e}")


def _parse(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:  # absl would print a multi-line usage message
        _fail(str(e).splitlines()[0])


def run() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
