"""The README's pod-planning table: per-device memory of one training step at 1024x1024 for SD3.5-large
full finetuning, FLUX.1-dev full finetuning and FLUX.1-dev LoRA, on 8 / 16 / 64 devices (all on fsdp, one
image per device), remat none / dots / full, from `mmdit_jax.training.plan` (what `mmdit-train --plan`
prints): parameters, optimizer state, EMA, frozen base and batch exact; the step's temporaries from XLA
compiling it with abstract inputs on virtual CPU devices (the CPU backend's buffer assignment, which
may differ from a GPU's or TPU's).

    python benchmarks/plan_table.py [--devices 8,16,64] [--remats none,dots,full] [--out plan.jsonl]
        [--no_compile] [--timeout 3000]

Each device count runs in its own process (the virtual device count is fixed when JAX starts); rows are
appended to --out as they finish, so an interrupted run keeps what it measured and a rerun skips them.
"""
import argparse
import json
import os
import subprocess
import sys

import common  # noqa: F401  (puts this checkout first on sys.path)

ACCELERATORS_GB = (16, 32, 80, 95, 141)
USABLE = 0.9  # of an accelerator's memory left for the step: the runtime, its context and fragmentation
RESOLUTION = 1024


def setups():
    """name -> (train config for `remat` and `devices`, network config)."""
    from mmdit_jax.families import preset
    from mmdit_jax.training import config as C

    def make(base, model_preset):
        def cfg(remat, devices):
            c = C.load_config(base)
            return c.replace(model=C.ModelConfig(preset=None, remat=remat), batch_size=devices,
                             mesh=C.MeshConfig(fsdp=-1))
        return cfg, preset(model_preset)

    return {"sd3.5-large full": make("sd3-medium-finetune", "sd3.5-large"),
            "flux-dev full": make("flux-dev-finetune", "flux-dev"),
            "flux-dev LoRA r16": make("flux-dev-lora", "flux-dev")}


def worker(devices, remats, out, compile_step, done):
    import dataclasses

    import jax

    from mmdit_jax.training.plan import plan

    assert len(jax.devices()) == devices, (len(jax.devices()), devices)
    for name, (make_cfg, net) in setups().items():
        for remat in remats:
            if (name, devices, remat) in done:
                continue
            cfg = make_cfg(remat, devices)
            cfg = cfg.replace(data=dataclasses.replace(cfg.data, resolution=RESOLUTION))
            rows = plan(cfg, net, compile_step=compile_step)
            rows.pop("mesh")
            with open(out, "a") as f:
                f.write(json.dumps(dict(setup=name, devices=devices, remat=remat, **rows)) + "\n")
            print(name, devices, remat, rows, flush=True)


def _gb(n):
    return f"{n / 1e9:.2f}"


def table(records) -> str:
    """GB = 1e9 bytes. `fits`: the accelerators (GB) whose USABLE share holds the step: on the exact
    state alone, and with XLA's temporaries where the step was compiled."""
    from mmdit_jax.training.plan import total_bytes

    def fits(n):
        return ", ".join(str(g) for g in ACCELERATORS_GB if n <= USABLE * g * 1e9) or "none"

    lines = ["| setup | devices | remat | params | optimizer | EMA | frozen | batch | state (exact) | fits, state "
             "only | temporaries (XLA:CPU) | total | fits, with temporaries |", "|---" * 13 + "|"]
    for r in records:
        state = sum(r[k] for k in ("params", "optimizer", "ema", "frozen", "batch"))
        compiled = "temporaries" in r
        temps, total, fit = ((_gb(r["temporaries"]), _gb(total_bytes(r)), fits(total_bytes(r))) if compiled
                             else ("not compiled", "", ""))
        lines.append(f"| {r['setup']} | {r['devices']} | {r['remat']} | {_gb(r['params'])} | "
                     f"{_gb(r['optimizer'])} | {_gb(r['ema'])} | {_gb(r['frozen'])} | {_gb(r['batch'])} | "
                     f"{_gb(state)} | {fits(state)} | {temps} | {total} | {fit} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="8,16,64")
    ap.add_argument("--remats", default="none,dots,full")
    ap.add_argument("--out", default="plan_table.jsonl")
    ap.add_argument("--no_compile", action="store_true", help="the exact parts only")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per device count")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    remats = a.remats.split(",")
    records = []
    if os.path.exists(a.out):
        with open(a.out) as f:
            records = [json.loads(line) for line in f if line.strip()]
    # a compiled row supersedes an exact-only one
    done = {(r["setup"], r["devices"], r["remat"]) for r in records if a.no_compile or "temporaries" in r}
    if a.worker is not None:
        worker(a.worker, remats, a.out, not a.no_compile, done)
        return
    for n in map(int, a.devices.split(",")):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={n}", f"--remats={a.remats}",
               f"--out={a.out}"] + (["--no_compile"] if a.no_compile else [])
        try:
            subprocess.run(cmd, env=env, timeout=a.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"{n} devices: stopped after {a.timeout:.0f} s; the rows so far are in {a.out}", flush=True)
    with open(a.out) as f:
        records = [json.loads(line) for line in f if line.strip()]
    best = {}
    for r in records:  # the compiled row of each (setup, devices, remat) when there is one
        key = (r["setup"], r["devices"], r["remat"])
        if key not in best or "temporaries" in r:
            best[key] = r
    order = list(setups())
    rows = sorted(best.values(), key=lambda r: (order.index(r["setup"]), r["devices"], remats.index(r["remat"])
                                                 if r["remat"] in remats else 99))
    print(table(rows))


if __name__ == "__main__":
    main()
