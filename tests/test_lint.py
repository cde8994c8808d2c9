"""Undefined names and unused imports fail the suite (ruff's pyflakes rules, F)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = ("mmdit_jax", "tests", "benchmarks", "convert", "sample", "train", "setup.py")


def test_pyflakes_rules_pass():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache",
                          "--output-format", "concise", *TREES], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
