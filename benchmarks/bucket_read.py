"""Read throughput from an object store vs local disk: images (a data folder, header scan + decode, as
the folder pipeline reads them) and cached latents (a precompute output's ArrayRecord shard: the first
read copies it locally, later epochs read the copy). The stores are the local emulators the tests use
(gcp-storage-emulator, moto), so the numbers measure the client path (gcsfs / s3fs over HTTP,
per-object requests), not a cloud network.

    python benchmarks/bucket_read.py [--images 64] [--records 256]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from storage_emulators import gcs_emulator, s3_emulator  # noqa: E402


def write_images(root, n, rng):
    os.makedirs(root)
    for i in range(n):  # ~0.25 MP JPEGs of smooth noise (compresses like photos)
        small = rng.integers(0, 256, (33, 49, 3), dtype=np.uint8)
        Image.fromarray(small).resize((768, 512), Image.BILINEAR).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
        with open(os.path.join(root, f"{i:05d}.txt"), "w") as f:
            f.write("a photo")


def image_rate(root):
    from mmdit_jax.data.folder import read_caption, read_image, scan_folder

    t = time.perf_counter()
    scan = scan_folder(root)
    for item in scan.items:
        read_image(item)
        read_caption(item)
    return len(scan.items) / (time.perf_counter() - t)


def write_records(out, n, rng):
    from mmdit_jax.data.arrayrecord import RecordWriter

    w = RecordWriter(out)
    for i in range(n):  # SD3 1024 px sized: latents 16x128x128, T5+CLIP context 333x4096 in bfloat16
        w.add((1024, 1024), f"k{i}", "c", rng.standard_normal((16, 128, 128), np.float32),
              rng.standard_normal((333, 4096), np.float32), rng.standard_normal(2048, np.float32))
    w.commit({"text_layout": []}, (np.zeros((333, 4096)), np.zeros(2048)))


def record_rate(folder):
    from mmdit_jax.data.arrayrecord import RecordSet, decode_record, open_source

    t = time.perf_counter()
    rs = RecordSet(folder)
    n = 0
    for _, _, file, count in rs.buckets:
        src = open_source(file)
        for i in range(count):
            decode_record(src[i])
            n += 1
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--records", type=int, default=128)
    a = ap.parse_args()
    from mmdit_jax.io import files, paths

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, gcs_emulator() as g, s3_emulator() as s:
        os.environ.update(g, **s, TENSORSTORE_GCS_HTTP_URL=g["STORAGE_EMULATOR_HOST"],
                          GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", MMDIT_CACHE=os.path.join(tmp, "cache"))
        write_images(os.path.join(tmp, "imgs"), a.images, rng)
        write_records(os.path.join(tmp, "recs"), a.records, rng)
        mb = sum(paths.files_under(os.path.join(tmp, "recs")).values()) / 1e6
        print(f"{a.images} JPEGs 768x512; {a.records} records ({mb:.0f} MB)")
        print("| source | images/s | records/s (first read) | records/s (cached copy) |")
        print("|---|---|---|---|")
        for name, root in (("local disk", tmp), ("gs:// (emulator)", "gs://bucket"), ("s3:// (emulator)", "s3://bucket")):
            if paths.is_remote(root):
                files.copy_tree(os.path.join(tmp, "imgs"), f"{root}/imgs")
                files.copy_tree(os.path.join(tmp, "recs"), f"{root}/recs")
            img = image_rate(paths.join(root, "imgs"))
            first = record_rate(paths.join(root, "recs"))
            again = record_rate(paths.join(root, "recs"))
            print(f"| {name} | {img:.0f} | {first:.0f} | {again:.0f} |")


if __name__ == "__main__":
    main()
