"""The benchmark harness's own arithmetic: analytic FLOP counts against the matmuls JAX actually traces,
and RESULTS.md section replacement."""
import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402
import run_all  # noqa: E402

import mmdit_jax as mj  # noqa: E402
from mmdit_jax.transformer import Transformer  # noqa: E402


def dot_flops(jaxpr) -> float:
    """2 * multiply-adds of every dot_general in a jaxpr, scan bodies counted `length` times."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            a, b = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(a[i] for i in lc)
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += mult * dot_flops(sub)
    return total


def traced_flops(cfg, batch, h, w, txt):
    tm = Transformer(cfg, params=None)
    params = Transformer.init(cfg, seed=0).params
    s = jax.ShapeDtypeStruct
    ch = getattr(cfg, "latent_channels", cfg.in_channels)
    args = [s((batch, h, w, ch), jnp.float32), s((batch,), jnp.float32),
            s((batch, txt, cfg.context_dim), jnp.float32), s((batch, cfg.pooled_dim), jnp.float32)]
    if getattr(cfg, "guidance_embed", False):
        args.append(s((batch,), jnp.float32))
    return dot_flops(jax.make_jaxpr(tm.apply)(params, *args).jaxpr)


@pytest.mark.parametrize("dual", [(), (0, 2)])
def test_sd3_flops_match_traced_matmuls(dual):
    # odd sizes: 3 heads of 16, 4 blocks (last one context pre-only), non-square 6x10 latent, 7 text tokens
    cfg = dataclasses.replace(mj.preset("sd3.5-medium"), num_layers=4, num_heads=3, head_dim=16,
                              context_dim=40, pooled_dim=24, pos_embed_max_size=8, dual_attention_layers=dual)
    got = common.flops_sd3(cfg, 3, 3 * 5, 7)
    assert got["total"] == pytest.approx(traced_flops(cfg, 3, 6, 10, 7), rel=1e-12)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_flops_match_traced_matmuls(guidance):
    cfg = dataclasses.replace(mj.preset("flux-dev"), num_heads=2, head_dim=32, axes_dim=(8, 12, 12), depth=2,
                              depth_single=3, context_dim=40, pooled_dim=24, guidance_embed=guidance)
    got = common.flops_flux(cfg, 2, 3 * 5, 9)
    assert got["total"] == pytest.approx(traced_flops(cfg, 2, 6, 10, 9), rel=1e-12)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux2_flops_match_traced_matmuls(guidance):
    cfg = dataclasses.replace(mj.preset("flux2-dev"), num_heads=2, head_dim=16, axes_dim=(4, 4, 4, 4), depth=2,
                              depth_single=3, context_dim=40, time_channels=64, in_channels=12, out_channels=12,
                              guidance_embed=guidance)
    params = Transformer.init(cfg, seed=0).params
    s = jax.ShapeDtypeStruct
    args = [s((2, 3, 5, 12), jnp.float32), s((2,), jnp.float32), s((2, 9, 40), jnp.float32), None]
    if guidance:
        args.append(s((2,), jnp.float32))
    traced = dot_flops(jax.make_jaxpr(Transformer(cfg, params=None).apply)(params, *args).jaxpr)
    assert common.flops_flux2(cfg, 2, 3 * 5, 9)["total"] == pytest.approx(traced, rel=1e-12)


def test_block_formula_is_the_issue_formula():
    # a FLUX single block (linear1 d -> 7d, linear2 5d -> d) costs the issue's 24*D^2*S + 4*D*S^2
    cfg = dataclasses.replace(mj.preset("flux-schnell"), depth=0, depth_single=1)
    d, s = cfg.hidden_size, 4096 + 512
    assert common.flops_flux(cfg, 1, 4096, 512)["blocks"] == 24 * d * d * s + 4 * d * s * s


def test_results_section_is_replaced_in_place(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    with open(path, "w") as f:
        f.write("# Benchmark results\n\n## Older section\n\nkept\n")
    run_all.write_results(f"{run_all.BEGIN}\nfirst table\n{run_all.END}\n", path)
    run_all.write_results(f"{run_all.BEGIN}\nsecond table\n{run_all.END}\n", path)
    text = open(path).read()
    assert text.startswith("# Benchmark results\n\n" + run_all.BEGIN)
    assert "second table" in text and "first table" not in text and text.count(run_all.BEGIN) == 1
    assert text.rstrip().endswith("## Older section\n\nkept")
    assert not os.path.exists(path + ".partial")


def test_render_reports_ratio_and_utilisation():
    timing = {"ours": {"median_s": 0.5}, "diffusers": {"median_s": 2.0},
              "peak_jax": {"median_s": 2 * common.PROBE_N ** 3 / 100e9}}
    res = {"what": "forward", "case": "sd3", "timing": timing, "flops": {"total": 40e9}, "parity_rel_err": 1e-6,
           "loadavg_start": "1.0 1.0 1.0", "memory_mib": {"ours": 10.0, "diffusers": 20.0}}
    rows = run_all.table([res])
    # 2.0 / 0.5 = 4x; 40 GFLOP in 0.5 s = 80 GFLOP/s, 80% of the 100 GFLOP/s matmul timed alongside
    assert "**4.00x**" in rows[-1] and "| 80.0 |" in rows[-1] and "80% (of 100)" in rows[-1]
    assert np.isfinite(common.probe_peak(timing))


def test_target_status_reports_the_bound_the_matmul_rate_puts_on_the_speed_up():
    n = common.PROBE_N
    probe_s = 2 * n ** 3 / 100e9  # matmuls at 100 GFLOP/s alongside
    timing = {"ours": {"median_s": 0.5}, "diffusers": {"median_s": 0.6}, "peak_jax": {"median_s": probe_s}}
    fwd = {"what": "forward", "case": "sd3", "timing": timing, "flops": {"total": 40e9},
           "parity_rel_err": 1e-6, "loadavg_start": "1.0 1.0 1.0"}
    train = {"what": "train", "case": "flux", "flops": {"total": 30e9},
             "timing": {**timing, "diffusers": {"median_s": 0.7}}}
    lines = run_all.target_status([fwd, train, {"what": "vae_decode", "case": "x"}])
    f = next(x for x in lines if x.startswith("- forward"))
    # 1.2x < 1.5x; eager at 40/0.6 = 66.7 GFLOP/s = 67% of 100, bound 100/66.7 = 1.50x; ours 80%
    assert "1.20x diffusers eager (target 1.5x: not met)" in f
    assert "67% of the matmul rate" in f and "more than 1.50x faster" in f
    assert "our utilisation 80% (target 65%: met)" in f
    t = next(x for x in lines if x.startswith("- train"))
    assert "1.40x diffusers eager (target 1.2x: met)" in t and "utilisation" not in t.split("faster here")[1]
    rows = run_all.table([fwd])
    assert rows[2].count("|") == rows[0].count("|") and "| 67% | 1.50x |" in rows[2]


def test_trainer_step_peak_and_full_preset():
    import trainer_step

    assert trainer_step.device_peak("bfloat16", 123.0) == (123e12, "--peak_tflops")
    flops, source = trainer_step.device_peak("float32")  # CPU: measured, and a plausible rate
    assert source == "measured float32 matmul rate" and 1e9 < flops < 1e14
    assert trainer_step.narrowed("flux-dev", 0, 4) == mj.preset("flux-dev")
    small = trainer_step.narrowed("sd3.5-medium", 3, 2)
    assert (small.num_layers, small.num_heads, small.dual_attention_layers) == (3, 2, (0, 1))


@pytest.mark.slow
def test_accelerator_benchmark_runs_every_section_at_tiny_size(tmp_path):
    """The unattended GPU command, at tiny sizes on CPU, exactly as a user runs it: every section gives
    its rows (no error row), so the command cannot rot before a GPU runs it."""
    import json
    import subprocess

    import accelerator

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rows.jsonl"
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "accelerator.py"), "--tiny",
                          f"--out={out}"], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, PYTHONPATH=root))
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("error" not in r for r in rows), rows
    assert {r["section"] for r in rows} == {name for name, _ in accelerator.SECTIONS}
    sampling = {r["contender"]: r for r in rows if r["section"] == "flux_sampling"}
    assert set(sampling) == {"ours", "diffusers", "diffusers_compiled"}
    assert float(sampling["ours"]["parity_rel_err"]) < 1e-4
    train = [r for r in rows if r["section"] in ("sd35_medium_train", "flux_lora_train")]
    assert [r["training"] for r in train] == ["full", "LoRA r16"] and all(r["steps_per_s"] > 0 for r in train)
    kernels = {(r["kernel"], r["variant"].split(" ")[0]) for r in rows if r["section"] == "attention"}
    assert {("xla", "one-shot"), ("xla", "chunked"), ("splash", "skipped:")} <= kernels, kernels
    for name, _ in accelerator.SECTIONS:
        assert f"### {name}" in res.stdout
