"""Sigma schedules against diffusers' FlowMatchEulerDiscreteScheduler (bit for bit), BFL's formula and
the reference DPM-Solver++(2M) coefficients."""
import json
import math

import numpy as np
import pytest

import mmdit_jax as mj
from mmdit_jax.sampling import schedules, solvers
from mmdit_jax.sampling.guidance import SkipLayerGuidance


def _diffusers(cfg_kw, n, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**cfg_kw)
    sch.set_timesteps(n, **kw)
    return sch.sigmas.numpy(), sch.timesteps.numpy(), dict(sch.config)


CASES = [
    (dict(shift=3.0), 28, {}),  # SD3 / SD3.5
    (dict(shift=3.0), 5, {}),
    (dict(shift=1.0), 4, {}),  # schnell: no shift
    (dict(shift=3.0, shift_terminal=0.05), 9, {}),
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 7, dict(mu=0.83)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), 6, dict(mu=1.7)),
    (dict(use_dynamic_shifting=True), 4, dict(sigmas=list(np.linspace(1.0, 1 / 4, 4)), mu=0.61)),  # FLUX
    (dict(shift=3.0), 3, dict(sigmas=[1.0, 0.55, 0.125])),  # user sigmas
]


@pytest.mark.parametrize("cfg_kw,n,kw", CASES)
def test_flow_match_sigmas_match_diffusers_exactly(cfg_kw, n, kw):
    ref_sigmas, ref_t, config = _diffusers(cfg_kw, None if "sigmas" in kw else n, **kw)
    cfg = schedules.SchedulerConfig.from_dict(config)
    ours = schedules.flow_match_sigmas(cfg, n, sigmas=kw.get("sigmas"), mu=kw.get("mu"))
    assert ours.dtype == np.float32 and ours.shape == (n + 1,)
    np.testing.assert_array_equal(ours, ref_sigmas)
    np.testing.assert_array_equal(schedules.timesteps_of(ours), ref_t)


def test_calculate_shift_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (16, 256, 1000, 4096, 9000):
        assert schedules.calculate_shift(n, 256, 4096, 0.5, 1.15) == calculate_shift(n, 256, 4096, 0.5, 1.15)


def test_bfl_schedule_formula():
    n, seq = 6, 1024
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    t = np.linspace(1, 0, n + 1)
    ref = np.array([0.0 if x == 0 else math.exp(mu) / (math.exp(mu) + 1 / x - 1) for x in t])
    ours = schedules.bfl_sigmas(n, seq)
    assert ours[0] == 1.0 and ours[-1] == 0.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(schedules.bfl_sigmas(n, seq, shift=False), t, atol=1e-7)  # schnell


def test_scheduler_config_errors(tmp_path):
    with pytest.raises(mj.MMDiTError, match="use_karras_sigmas"):
        schedules.SchedulerConfig.from_dict({"use_karras_sigmas": True}, "x.json")
    with pytest.raises(mj.MMDiTError, match="DDIMScheduler"):
        schedules.SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"}, "x.json")
    with pytest.raises(mj.MMDiTError, match="scheduler_config.json"):
        schedules.read_scheduler_config(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    assert schedules.read_scheduler_config(tmp_path).shift == 3.0
    with pytest.raises(mj.MMDiTError, match="mu"):
        schedules.flow_match_sigmas(schedules.SchedulerConfig(use_dynamic_shifting=True), 4)


def test_img2img_truncation_matches_diffusers_get_timesteps():
    s = np.linspace(1, 0, 11).astype(np.float32)
    for strength in (0.0, 0.35, 0.6, 1.0):
        n = 10
        init = min(n * strength, n)
        t_start = int(max(n - init, 0))
        if n - t_start < 1:
            with pytest.raises(mj.MMDiTError):
                schedules.truncate_for_strength(s, strength)
        else:
            np.testing.assert_array_equal(schedules.truncate_for_strength(s, strength), s[t_start:])
    with pytest.raises(mj.MMDiTError, match="strength"):
        schedules.truncate_for_strength(s, 1.5)


def test_dpmpp_2m_table_against_the_reference_formula():
    """Coefficients reproduce sample_dpmpp_2m's update (written with lambda = -log sigma) on random data."""
    sig = np.array([1.0, 0.8, 0.5, 0.2, 0.05, 0.0])
    r = np.random.default_rng(0)
    x_ref = x = r.standard_normal(5)
    old = None
    tab = solvers.step_table("dpmpp_2m", sig)
    prev = np.zeros(5)
    for i in range(len(sig) - 1):
        d = r.standard_normal(5)
        t, t_next = -np.log(sig[i]), (-np.log(sig[i + 1]) if sig[i + 1] > 0 else np.inf)
        h = t_next - t
        if old is None or sig[i + 1] == 0:
            x_ref = (np.exp(-t_next) / np.exp(-t)) * x_ref - np.expm1(-h) * d
        else:
            rr = (t + np.log(sig[i - 1])) / h
            x_ref = (np.exp(-t_next) / np.exp(-t)) * x_ref - np.expm1(-h) * ((1 + 1 / (2 * rr)) * d - old / (2 * rr))
        old = d
        x = tab["ratio"][i] * x + tab["c_d"][i] * d + tab["c_old"][i] * prev
        prev = d
    np.testing.assert_allclose(x, x_ref, rtol=1e-5, atol=1e-6)


def test_skip_layer_steps_as_diffusers_counts_them():
    slg = SkipLayerGuidance((7, 8, 9), 2.8, 0.01, 0.2)
    n = 28
    ref = [i > n * 0.01 and i < n * 0.2 for i in range(n)]
    assert slg.active_steps(n).tolist() == ref
    with pytest.raises(mj.MMDiTError):
        SkipLayerGuidance((1,), 2.8, 0.5, 0.2)
