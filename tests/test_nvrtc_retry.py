"""A driver that refuses one NVRTC's image gets another NVRTC's (docs/cuda.md): with NVRTC
12 and 13 both installed (CI installs both wheels), the stand-in driver refuses the first
NVRTC image and lpl_ext loads the second NVRTC's instead of giving up."""

from __future__ import annotations

import pytest

from lpl_ext import _cuda
from test_cuda_loader import NVRTC_LIBS, NVRTC_SKIP, fake_cuda, fake_libcuda  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(len(NVRTC_LIBS) < 2, reason=NVRTC_SKIP)


def _two_nvrtc(monkeypatch):
    newest_first = [path for _, path in sorted(NVRTC_LIBS.items(), reverse=True)]
    monkeypatch.setattr(_cuda, "nvrtc_candidates", lambda *a, **k: list(newest_first))
    return newest_first


def test_driver_refusing_one_nvrtc_image_gets_the_other_nvrtcs(fake_cuda, monkeypatch):  # noqa: F811
    newest, older = _two_nvrtc(monkeypatch)
    monkeypatch.setenv("LPL_EXT_KERNELS", "nvrtc")
    monkeypatch.setenv("FAKE_CUDA_REJECT_CUBIN", "1")  # the first ELF image handed to the driver is refused
    kernels, origin = _cuda.load_kernels(0)
    assert kernels is not None
    want_major = _cuda._soname_major(older.rsplit("/", 1)[-1])
    assert origin.startswith(f"NVRTC {want_major}."), origin
    assert _cuda._state["nvrtc"].path == older  # the accepted NVRTC is the one kept
    assert [f[3] for f in fake_cuda.lines("load")] == ["elf=1"]  # one image loaded, after one refusal


def test_every_nvrtc_refused_lists_each_one(fake_cuda, monkeypatch):  # noqa: F811
    newest, older = _two_nvrtc(monkeypatch)
    monkeypatch.setenv("LPL_EXT_KERNELS", "nvrtc")
    monkeypatch.setenv("FAKE_CUDA_REJECT_CUBIN", "2")
    with pytest.raises(RuntimeError) as exc:
        _cuda.load_kernels(0)
    msg = str(exc.value)
    assert f"({newest}): " in msg and f"({older}): " in msg
    assert msg.count("CUDA_ERROR_UNSUPPORTED_PTX_VERSION") == 2
