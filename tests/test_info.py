"""`python -m mmdit_jax.info` reports what JAX sees, and the accelerator extras of setup.py resolve."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_names_backend_devices_and_flags():
    import jax

    flags = "--xla_force_host_platform_device_count=3"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    res = subprocess.run([sys.executable, "-m", "mmdit_jax.info"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"jax: {jax.__version__}" in lines
    assert "backend: cpu" in lines
    assert any(line.startswith("devices: 3 (cpu)") for line in lines), lines
    assert "processes: 1 (this is process 0)" in lines
    assert any(line.startswith("attention: backend setting 'auto' -> float32 inputs use 'xla'")
               for line in lines), lines
    assert f"  XLA_FLAGS={flags}" in lines


def _setup_kwargs():
    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    return captured


def test_plain_install_is_cpu_only_and_info_is_a_console_script():
    kw = _setup_kwargs()
    jax_reqs = [r for r in kw["install_requires"] if r.split("[")[0].split(">")[0].strip() == "jax"]
    assert jax_reqs and all("[" not in r for r in jax_reqs), jax_reqs
    assert "mmdit-info=mmdit_jax.info:run" in kw["entry_points"]["console_scripts"]


@pytest.mark.slow
@pytest.mark.parametrize("extra,wheel", [("cuda", "jax-cuda13-plugin"), ("cuda12", "jax-cuda12-plugin"),
                                         ("tpu", "libtpu")])
def test_accelerator_extra_resolves_against_the_registry(extra, wheel):
    """pip's resolver (dry run: metadata only, nothing installed) finds the accelerator build of JAX."""
    reqs = _setup_kwargs()["extras_require"][extra]
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--disable-pip-version-check", "--report", "-", *reqs],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(res.stdout)["install"]}
    assert wheel in names and "jax" in names, sorted(names)
