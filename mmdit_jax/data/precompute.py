"""Encode an image-caption folder once into ArrayRecord files (see arrayrecord.py) for training without
running the VAE and text encoders every step. Images are resized and centre-cropped to their buckets
exactly as the on-the-fly pipeline does (no flips: those need the pixels)."""
from __future__ import annotations

import sys

import numpy as np

from mmdit_jax.data import buckets as bk
from mmdit_jax.data.arrayrecord import RecordWriter
from mmdit_jax.data.encode import load_encoders
from mmdit_jax.data.folder import BAD_IMAGE, read_caption, read_image, scan_folder
from mmdit_jax.errors import MMDiTError
from mmdit_jax.progress import Progress


def precompute(src: str, encoders_path: str, out: str, *, resolution: int = 256, buckets: bool = True,
               bucket_step: int = 64, min_bucket_size: int = 1, batch_size: int = 8,
               max_sequence_length: int | None = None, dtype: str = "float32", caption_ext: str = ".txt",
               overwrite: bool = False, store_dtype: str = "float32", stream=None) -> dict:
    """Writes `out` (a folder, atomically) and returns its metadata."""
    stream = stream or sys.stderr
    if batch_size < 1 or min_bucket_size < 1:
        raise MMDiTError("precompute batch_size and min_bucket_size must be positive")
    enc = load_encoders(encoders_path, dtype, max_sequence_length)
    m = enc.pixel_multiple
    side, what = (bucket_step, "bucket_step") if buckets else (resolution, "resolution")
    if side % m:
        raise MMDiTError(f"precompute {what} {side} must be a multiple of {m} (the VAE's downsampling times "
                         "the 2x2 latent patches)")
    shapes = bk.make_buckets(resolution, bucket_step) if buckets else [(resolution, resolution)]
    scan = scan_folder(src, caption_ext)
    assign = bk.merge_small([bk.nearest_bucket(it.height, it.width, shapes) for it in scan.items], shapes,
                            min_bucket_size)
    skipped = dict(scan.skipped)
    writer = RecordWriter(out, overwrite=overwrite, dtype=store_dtype)
    progress = Progress("precompute", len(scan.items), unit="images", stream=stream)
    try:
        for b in sorted(set(assign)):  # the bucket order the on-the-fly pipeline uses
            members = [it for it, a in zip(scan.items, assign) if a == b]
            for start in range(0, len(members), batch_size):
                images, captions, keys = [], [], []
                for it in members[start:start + batch_size]:
                    try:
                        images.append(bk.fit(read_image(it), shapes[b]))
                        captions.append(read_caption(it))
                        keys.append(it.key)
                    except BAD_IMAGE as e:
                        skipped[it.key] = f"unreadable: {type(e).__name__}: {e}"
                if images:
                    out_b = enc(np.stack(images), captions)
                    for i, key in enumerate(keys):
                        writer.add(shapes[b], key, captions[i], out_b["latents"][i], out_b["context"][i],
                                   out_b["pooled"][i])
                progress.update(len(members[start:start + batch_size]))
        meta = {"source": src, "family": enc.text.family, "resolution": resolution, "aspect_buckets": buckets,
                "bucket_step": bucket_step, "dtype": dtype, "store_dtype": store_dtype,
                "max_sequence_length": max_sequence_length or enc.text.default_max_sequence_length,
                "text_layout": [s.to_json() for s in enc.text_layout], "skipped": skipped,
                "uncaptioned": scan.uncaptioned}
        meta = writer.commit(meta, enc.null_text)
    except BaseException:
        writer.abort()
        raise
    progress.update(0, force=True)
    written = sum(b["count"] for b in writer.buckets.values())
    print(f"precompute: wrote {written} examples in {len(writer.buckets)} shapes to {out}; skipped "
          f"{len(skipped)} unreadable files", file=stream, flush=True)
    return meta
