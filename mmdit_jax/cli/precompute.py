"""`mmdit-precompute`: encode an image-caption folder into ArrayRecord files of latents and text embeddings
(read back with DataConfig(kind="arrayrecord", path=OUT))."""
import sys

from absl import app, flags

from mmdit_jax.errors import MMDiTError

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "folder of images with captions (a.png + a.txt)")
flags.DEFINE_string("encoders", None, "diffusers pipeline folder with vae/ and the text encoders")
flags.DEFINE_string("out", None, "output folder (created atomically)")
flags.DEFINE_integer("resolution", 256, "target side in pixels: buckets hold about resolution**2 pixels")
flags.DEFINE_boolean("buckets", True, "aspect-ratio buckets (else square resolution x resolution crops)")
flags.DEFINE_integer("bucket_step", 64, "bucket sides are multiples of this")
flags.DEFINE_integer("min_bucket_size", 1, "buckets with fewer images are merged into the nearest one")
flags.DEFINE_integer("batch_size", 8, "images encoded per call")
flags.DEFINE_integer("max_sequence_length", None, "T5 tokens (default: the family's pipeline default)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "encoders' compute dtype (records are float32)")
flags.DEFINE_enum("store_dtype", "float32", ["float32", "bfloat16"], "dtype of the stored arrays (read back as "
                  "float32); bfloat16 halves the files")
flags.DEFINE_string("caption_ext", ".txt", "caption file extension")
flags.DEFINE_boolean("overwrite", False, "replace an existing output folder")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        for name in ("src", "encoders", "out"):
            if not getattr(FLAGS, name):
                raise MMDiTError(f"--{name} is required")
        from mmdit_jax.data.precompute import precompute

        precompute(FLAGS.src, FLAGS.encoders, FLAGS.out, resolution=FLAGS.resolution, buckets=FLAGS.buckets,
                   bucket_step=FLAGS.bucket_step, min_bucket_size=FLAGS.min_bucket_size,
                   batch_size=FLAGS.batch_size, max_sequence_length=FLAGS.max_sequence_length,
                   dtype=FLAGS.dtype, caption_ext=FLAGS.caption_ext, overwrite=FLAGS.overwrite,
                   store_dtype=FLAGS.store_dtype)
    except MMDiTError as e:
        print(f"mmdit-precompute: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
