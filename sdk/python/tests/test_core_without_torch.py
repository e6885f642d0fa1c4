"""The core SDK imports and works in the core environment, where torch is absent."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import SDK

ROOT = SDK.parents[1]

SCRIPT = r"""
import sys, numpy as np
import arenahost
from arenahost import linear_forward, Plugin, HostClient
from arenahost.nf4 import quantize_nf4, dequantize_4bit_arrays, NF4_CODE
from arenahost.pipelines import reference
w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
p, a = quantize_nf4(w, 64)
wd = dequantize_4bit_arrays(p, a, NF4_CODE, 64, (16, 8), "bfloat16")
y = linear_forward(np.ones((2, 8), np.float32), w)
Plugin("x", "1")
assert "torch" not in sys.modules, "torch was imported"
try:
    import torch
    print("TORCH-PRESENT")
except ImportError:
    print("OK-NO-TORCH")
"""


def test_core_runs_without_torch():
    py = os.environ.get("ARENAHOST_PYTHON") or str(ROOT / ".venv/bin/python")
    if not Path(py).exists():
        if os.environ.get("ARENAHOST_REQUIRE_PYTHON") == "1":
            pytest.fail(f"core interpreter {py} missing")
        pytest.skip(f"core interpreter {py} missing")
    env = dict(os.environ, PYTHONPATH=str(SDK))
    r = subprocess.run([py, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK-NO-TORCH" in r.stdout, r.stdout + r.stderr
