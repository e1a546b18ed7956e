"""``python -m lpl_ext``: what it prints and when it fails (the CPU side; a GPU's check
runs on GPU machines)."""

from __future__ import annotations

import io
import subprocess
import sys

import lpl_ext
from lpl_ext import diagnostics


def test_report_on_this_machine():
    out = io.StringIO()
    assert diagnostics.report(out) == 0
    text = out.getvalue()
    assert f"lpl_ext {lpl_ext.__version__} (revision " in text
    assert "numpy " in text and "torch " in text
    assert "CUDA kernels: shipped cubins" in text and "NVRTC:" in text and "kernel cache:" in text
    assert "check cpu: ok: feature_distance matches numpy" in text
    assert text.rstrip().endswith("result: ok")


def test_a_device_that_cannot_run_the_kernels_fails_the_run():
    def broken() -> str:
        raise RuntimeError("lpl_ext: no CUDA kernels for cuda:0 (compute capability 9.0, ...)")

    out = io.StringIO()
    status = diagnostics.report(out, checks=[("cpu", diagnostics._check_cpu), ("cuda:0", broken)])
    text = out.getvalue()
    assert status == 1
    assert "check cuda:0: FAILED: RuntimeError: lpl_ext: no CUDA kernels for cuda:0" in text
    assert "check cpu: ok" in text and "result: FAILED on cuda:0" in text


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lpl_ext"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: ok" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "lpl_ext", "--frobnicate"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "take no arguments" in bad.stderr
