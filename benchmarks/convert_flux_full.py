"""Full-size FLUX conversion: peak memory and time of `mmdit-convert` on a released-size checkpoint
(FLUX.1-dev: 24 GB; `--preset=flux2-dev`: 64 GB, or a FLUX.2 klein preset).

Writes a random transformer of the preset in BFL layout, bfloat16 (streamed: building it needs no
memory of its size; a cached file is reused), converts it to Orbax with `convert/convert.py --dtype=bfloat16` in a
subprocess, then exports the result back to a BFL single file (`--to=original`), measuring each
child's peak RSS (getrusage of children) and wall time, and checking the round trip bit for bit on a
sample of tensors. Deletes everything it wrote unless --keep.

    python benchmarks/convert_flux_full.py [--preset flux-dev] [--dir /tmp/mmdit_flux_bench] [--keep]
                                           [--no-export]
"""
import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mmdit_jax as mj  # noqa: E402
from mmdit_jax.conversion.synthetic import checkpoint_specs, write_random_checkpoint  # noqa: E402


def free_gb(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1e9


def run_child(args):
    """Runs one child; returns (wall s, peak RSS GB of that child, tail of its output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.monotonic()
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # echo progress as it comes
        print("   ", line.rstrip(), flush=True)
        lines.append(line)
    rc = proc.wait()
    wall = time.monotonic() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rc != 0:
        raise SystemExit(f"child failed ({rc}): {''.join(lines[-5:])}")
    # ru_maxrss of children is the max over all waited children: only meaningful if this one is larger
    return wall, max(peak, before) / 2**20, peak > before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux-dev", help="flux-dev, flux2-dev, flux2-klein-4b, ...")
    ap.add_argument("--dir", default="/tmp/mmdit_flux_bench")
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoint for another run")
    ap.add_argument("--no-export", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, f"{args.preset}-random.safetensors")
    out, back = os.path.join(args.dir, "orbax"), os.path.join(args.dir, "back")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)

    cfg = mj.preset(args.preset)
    specs = checkpoint_specs(cfg, "original", "bfloat16")
    total = sum(int(np.prod(s)) * d.itemsize for _, s, d in specs)
    largest = max(specs, key=lambda x: int(np.prod(x[1])))
    stacked = cfg.depth_single * int(np.prod(largest[1])) * 2
    print(f"{args.preset}: {len(specs)} tensors, {total / 1e9:.2f} GB bf16; largest stacked array "
          f"(single blocks' linear1, {cfg.depth_single} x {largest[1][1]} x {largest[1][0]}) "
          f"{stacked / 1e9:.2f} GB; free disk {free_gb(args.dir):.0f} GB", flush=True)

    if not (os.path.isfile(src) and os.path.getsize(src) > total):
        if free_gb(args.dir) < 2.2 * total / 1e9:
            raise SystemExit("not enough free disk for the source and the converted copy")
        t = time.monotonic()
        write_random_checkpoint(src, specs, on_tensor=lambda i, n: i % 100 == 0 and print(
            f"    wrote {i}/{n} tensors, {time.monotonic() - t:.0f} s", flush=True))
        print(f"source written in {time.monotonic() - t:.0f} s", flush=True)

    results = []
    wall, peak, own = run_child([sys.executable, os.path.join(ROOT, "convert", "convert.py"),
                                 f"--src={src}", f"--out={out}", "--dtype=bfloat16"])
    results.append(("convert BFL file -> Orbax (bfloat16)", wall, peak, own))
    print(f"convert: {wall:.0f} s, peak RSS {peak:.2f} GB", flush=True)

    if not args.no_export:
        if free_gb(args.dir) < 1.1 * total / 1e9:
            print("skipping export: not enough free disk", flush=True)
        else:
            wall, peak, own = run_child([sys.executable, os.path.join(ROOT, "convert", "convert.py"),
                                         "--to=original", f"--src={out}", f"--out={back}"])
            results.append(("export Orbax -> BFL file", wall, peak, own))
            print(f"export: {wall:.0f} s, peak RSS {peak:.2f} GB", flush=True)
            from mmdit_jax.io.safetensors_io import TensorFile

            a, b = TensorFile(src), TensorFile(os.path.join(back, "flux.safetensors"))
            assert sorted(a) == sorted(b)
            for k in list(a)[::37] + [largest[0]]:
                assert np.array_equal(np.asarray(a[k]).view(np.uint16), np.asarray(b[k]).view(np.uint16)), k
            print("round trip: sampled tensors bit-identical", flush=True)

    print()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    print("| step | wall s | peak RSS GiB |")
    print("|---|---|---|")
    for name, wall, peak, own in results:
        print(f"| {name} | {wall:.0f} | {peak:.2f}{'' if own else ' (<= an earlier child)'} |")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)
    if not args.keep:
        os.remove(src)


if __name__ == "__main__":
    main()
