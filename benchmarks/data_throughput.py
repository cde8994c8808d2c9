"""Host-side data throughput: folder scan, image decode + resize + crop (the part grain's reader threads
parallelise; encoding excluded), and reading precomputed SD3-sized records back as batches.

    python benchmarks/data_throughput.py [--images 256] [--records 256]
"""
import argparse
import functools
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from mmdit_jax.data import DataConfig, make_train_data
from mmdit_jax.data.arrayrecord import RecordWriter
from mmdit_jax.data.buckets import make_buckets, nearest_bucket
from mmdit_jax.data.encode import TextSegment
from mmdit_jax.data.folder import scan_folder
from mmdit_jax.data.pipeline import _load_folder, _Stream


def write_images(root, n, rng):
    """Photo-sized JPEGs (random aspect 1:2 .. 2:1, ~0.3-1 MP) of smooth noise (compresses like photos)."""
    os.makedirs(root)
    for i in range(n):
        h = int(rng.integers(500, 1000))
        w = int(h * np.exp(rng.uniform(-0.7, 0.7)))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
        with open(os.path.join(root, f"{i:05d}.txt"), "w") as f:
            f.write("a photo")


def image_rate(root, threads, resolution, n):
    scan = scan_folder(root)
    shapes = make_buckets(resolution, 64)
    items = [it for it in scan.items if nearest_bucket(it.height, it.width, shapes) == 2]  # one bucket
    load = functools.partial(_load_folder, shape=shapes[2], random_crop=True, flip=True)
    stream = _Stream(items, load, seed=0, shuffle=True, threads=threads, buffer=max(16, 2 * threads))
    next(stream)  # start the threads
    t = time.perf_counter()
    for _ in range(n):
        next(stream)
    return n / (time.perf_counter() - t)


def record_rate(root, n, dtype, batch):
    rng = np.random.default_rng(0)
    lat, ctx, pooled = (64, 64, 16), (77 + 256, 4096), (2048,)  # SD3 at 512 px, T5 length 256
    out = os.path.join(root, f"records-{dtype}")
    w = RecordWriter(out, dtype=dtype)
    a, c, p = (rng.standard_normal(s).astype(np.float32) for s in (lat, ctx, pooled))
    for i in range(n):
        w.add((512, 512), f"{i}", "a photo", a, c, p)
    layout = [TextSegment("t5", slice(77, 333), slice(0, 4096), slice(0, 0)).to_json()]
    w.commit({"max_sequence_length": 256, "text_layout": layout}, (c, p))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / n / 2 ** 20
    data = make_train_data(DataConfig(kind="arrayrecord", path=out, num_workers=4), batch_size=batch, seed=0,
                           encoders_path=None)
    next(data)
    t = time.perf_counter()
    steps = n // batch
    for _ in range(steps):
        next(data)
    return steps * batch / (time.perf_counter() - t), size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "images")
        write_images(root, args.images, rng)
        t = time.perf_counter()
        scan = scan_folder(root)
        scan_rate = len(scan.items) / (time.perf_counter() - t)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.images} JPEGs, resolution "
              f"{args.resolution}")
        print("| what | rate |\n|---|---|")
        print(f"| folder scan (headers) | {scan_rate:.0f} images/s |")
        for threads in (0, 1, 2, 4):
            r = image_rate(root, threads, args.resolution, 96)
            print(f"| decode + resize + crop + flip to 512x512, {threads} reader threads | {r:.1f} images/s |")
        for dtype in ("float32", "bfloat16"):
            r, mb = record_rate(tmp, args.records, dtype, 8)
            print(f"| SD3 records ({dtype}, {mb:.2f} MB each) read as batches of 8 | {r:.0f} examples/s |")


if __name__ == "__main__":
    main()
