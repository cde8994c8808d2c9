"""The machine's dense float32 matmul rate, measured through torch and through XLA (run_all.py divides
achieved FLOP/s by the higher of the two).

    python benchmarks/matmul_peak.py [--sizes 1024,2048,3072]
"""
import argparse

import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,2048,3072")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    load0 = common.loadavg()
    res = common.matmul_peak(tuple(int(n) for n in a.sizes.split(",")), reps=a.reps)
    for k, v in res["by_size"].items():
        print(k, ", ".join(f"{n}: {f / 1e9:.1f} GFLOP/s" for n, f in v.items()), flush=True)
    common.emit({"what": "matmul_peak", "case": a.sizes, "loadavg_start": load0, **res,
                 "settings": common.settings()})


if __name__ == "__main__":
    main()
