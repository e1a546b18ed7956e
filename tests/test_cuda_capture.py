"""CUDA calls under stream capture and on memory that is not the device's, on the
emulated device (docs/cuda.md, "CUDA graphs" and "The emulated device").

The stand-in driver (tests/fake_cuda/fake_libcuda.c) models stream capture as a GPU does:
while a capture is open, module loads, allocations and synchronous calls from a thread
not in relaxed capture mode fail with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and
invalidate the capture, and work on the legacy default stream fails with
CUDA_ERROR_STREAM_CAPTURE_IMPLICIT. So these tests fail if lpl_ext ever loads a module
lazily at a launch, allocates, or synchronizes inside a caller's capture. The stand-in
also answers cuPointerGetAttributes from ranges a test registers, so a CUDA-labelled
tensor over host memory must be refused with a ValueError before any launch."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from lpl_ext import _C, _cuda
from test_cuda_emulated import (STREAM, Emu, cpu_feature_distance, cpu_outlier_mask, emu, _fd_inputs,  # noqa: F401
                                _on_device, _storage, assert_gradient_matches_cpu)
from test_cuda_loader import FakeCudaArray

CAPTURE_GLOBAL, CAPTURE_THREAD_LOCAL, CAPTURE_RELAXED = 0, 1, 2
CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED = 900, 901
MEM_NOT_CUDA, MEM_HOST, MEM_DEVICE = 0, 1, 2


@pytest.fixture
def hooks(emu):
    lib = emu.hooks
    lib.fake_begin_capture.argtypes = [ctypes.c_ulonglong, ctypes.c_int]
    lib.fake_end_capture.argtypes = [ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_int)]
    lib.fake_register_memory.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_int]
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    emu.clear()
    yield lib
    lib.fake_clear_memory()
    for stream in (STREAM, STREAM + 1):  # a failed test may leave its capture open
        lib.fake_end_capture(stream, None)


def _end(lib, stream: int) -> tuple:
    recorded = ctypes.c_int(-1)
    rc = lib.fake_end_capture(stream, ctypes.byref(recorded))
    return rc, recorded.value


def _fd_call(kernels, x, y, mask, stream=STREAM):
    n, c = x.shape[:2]
    loss = FakeCudaArray(np.full(n, np.nan))
    grad = FakeCudaArray(np.zeros(tuple(x.shape), _storage(x.dtype)))
    ws = FakeCudaArray(np.full(_C.feature_distance_workspace(n, c), np.nan))
    _C.feature_distance(_on_device(x), _on_device(y), None if mask is None else _on_device(mask), loss, grad,
                        "default", "mse", 1.0, stream=stream, workspace=ws, kernels=kernels)
    return loss.array, grad.array


def _om_call(kernels, y, stream=STREAM):
    keep = FakeCudaArray(np.zeros(tuple(y.shape), np.bool_))
    stats = FakeCudaArray(np.zeros(3))
    ws = FakeCudaArray(np.zeros(_C.outlier_mask_workspace_bytes(*y.shape), np.uint8))
    _C.outlier_mask(_on_device(y), keep, stats, 0.02, 2.0, 3, 3, stream=stream, workspace=ws, kernels=kernels)
    return keep.array.view(np.uint8), stats.array


# ---- the stand-in enforces the capture rules ------------------------------------------------


def test_stand_in_refuses_a_module_load_inside_a_global_capture(hooks):
    """The premise of the tests below: an unsafe call inside a capture fails and
    invalidates it, unless the calling thread is in relaxed mode."""
    image = b"//\n.version 8.0\n.target sm_90\n"
    module = ctypes.c_void_p()
    assert hooks.fake_begin_capture(STREAM, CAPTURE_GLOBAL) == 0
    assert hooks.cuModuleLoadData(ctypes.byref(module), image) == CAPTURE_UNSUPPORTED
    assert _end(hooks, STREAM)[0] == CAPTURE_INVALIDATED
    assert hooks.fake_begin_capture(STREAM, CAPTURE_RELAXED) == 0  # relaxed: allowed
    assert hooks.cuModuleLoadData(ctypes.byref(module), image) == 0
    assert hooks.cuModuleUnload(module) == 0
    assert _end(hooks, STREAM) == (0, 0)


@pytest.mark.parametrize("mode", [CAPTURE_GLOBAL, CAPTURE_THREAD_LOCAL])
def test_first_ever_call_inside_a_capture(emu, hooks, monkeypatch, mode):
    """No kernel loaded yet, and the first calls of the process come inside a capture:
    lpl_ext loads its module there (in relaxed mode, every function and its shared-memory
    opt-in at once), records only stream work on the capturing stream, and leaves the
    capture valid; the results equal an uncaptured call's."""
    monkeypatch.setattr(_cuda, "_state", {"driver": None, "kernels": {}, "nvrtc": None})
    monkeypatch.setenv("LPL_EXT_KERNEL_SET", emu.kernel_set)
    x, y, mask = _fd_inputs((2, 3, 9, 11), torch.float32, True)
    ym = torch.randn(1, 2, 12, 10, generator=torch.Generator().manual_seed(3))
    assert hooks.fake_begin_capture(STREAM, mode) == 0
    kernels = _cuda.kernels_for(torch.device("cuda", 0))  # the first load of this process
    loss, grad = _fd_call(kernels, x, y, mask)
    keep, stats = _om_call(kernels, ym)
    rc, recorded = _end(hooks, STREAM)
    assert rc == 0
    launched = [ln for ln in emu.launches() if ln["kind"] == "launch"]
    assert recorded > 0 and len(launched) <= recorded and all(ln["captured"] == "1" for ln in launched)
    assert not [ln for ln in emu.launches() if ln["kind"] == "refused"]
    want_loss, want_grad = cpu_feature_distance(x, y, mask, "default", "mse", 1.0)
    assert_gradient_matches_cpu(emu, grad, want_grad, torch.float32, "default")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    want_keep, _ = cpu_outlier_mask(ym, 3, 3)
    np.testing.assert_array_equal(keep, want_keep)


def test_legacy_stream_inside_a_capture_is_refused(emu, hooks):
    """Work on the legacy default stream while another stream captures would synchronize
    with it: the driver refuses it, and lpl_ext reports the driver's error."""
    x, y, mask = _fd_inputs((1, 2, 4, 4), torch.float32, False)
    assert hooks.fake_begin_capture(STREAM, CAPTURE_GLOBAL) == 0
    with pytest.raises(RuntimeError, match="CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"):
        _fd_call(emu.kernels, x, y, mask, stream=0)
    assert _end(hooks, STREAM)[0] == CAPTURE_INVALIDATED
    emu.clear()


# ---- memory that is not the device's --------------------------------------------------------


def _register(hooks, arr: FakeCudaArray, memory_type: int, ordinal: int = 0, size: int | None = None) -> None:
    a = arr.array
    assert hooks.fake_register_memory(a.ctypes.data, a.nbytes if size is None else size, memory_type, ordinal) == 0


@pytest.mark.parametrize("what,memory_type,ordinal,size,message", [
    ("host", MEM_HOST, 0, None, "labelled cuda:0, but its memory at 0x[0-9a-f]+ is host memory"),
    ("not-cuda", MEM_NOT_CUDA, 0, None, "is not CUDA memory"),
    ("other-device", MEM_DEVICE, 1, None, "labelled cuda:0, but its memory belongs to cuda:1"),
    ("short-allocation", MEM_DEVICE, 0, 8, "run past the end of their CUDA allocation"),
])
@pytest.mark.parametrize("tensor", ["x", "grad", "workspace"])
def test_feature_distance_refuses_memory_that_is_not_the_devices(emu, hooks, what, memory_type, ordinal, size,
                                                                  message, tensor):
    x, y, _ = _fd_inputs((1, 2, 4, 4), torch.float32, False)
    args = {"x": FakeCudaArray(x.numpy()), "y": FakeCudaArray(y.numpy()), "loss": FakeCudaArray(np.zeros(1)),
            "grad": FakeCudaArray(np.zeros((1, 2, 4, 4), np.float32)),
            "workspace": FakeCudaArray(np.zeros(_C.feature_distance_workspace(1, 2)))}
    _register(hooks, args[tensor], memory_type, ordinal, size)
    with pytest.raises(ValueError, match=f"^{tensor}: .*{message}"):
        _C.feature_distance(args["x"], args["y"], None, args["loss"], args["grad"], "none", "mse", 1.0,
                            stream=STREAM, workspace=args["workspace"], kernels=emu.kernels)
    assert emu.launches() == []  # refused before any launch


@pytest.mark.parametrize("tensor", ["y", "keep", "stats"])
def test_outlier_mask_refuses_host_memory(emu, hooks, tensor):
    y = torch.randn(1, 1, 6, 6)
    args = {"y": FakeCudaArray(y.numpy()), "keep": FakeCudaArray(np.zeros((1, 1, 6, 6), np.bool_)),
            "stats": FakeCudaArray(np.zeros(3))}
    _register(hooks, args[tensor], MEM_HOST)
    ws = FakeCudaArray(np.zeros(_C.outlier_mask_workspace_bytes(1, 1, 6, 6), np.uint8))
    with pytest.raises(ValueError, match=f"^{tensor}: labelled cuda:0, but its memory .* is host memory"):
        _C.outlier_mask(args["y"], args["keep"], args["stats"], 0.02, 2.0, 3, 3, stream=STREAM, workspace=ws,
                        kernels=emu.kernels)
    assert emu.launches() == []


def test_device_memory_in_range_is_accepted(emu, hooks):
    """The check passes registered device memory covering each tensor exactly."""
    x, y, _ = _fd_inputs((1, 2, 4, 4), torch.float32, False)
    xs, ys = FakeCudaArray(x.numpy()), FakeCudaArray(y.numpy())
    _register(hooks, xs, MEM_DEVICE)
    _register(hooks, ys, MEM_DEVICE)
    loss = FakeCudaArray(np.zeros(1))
    ws = FakeCudaArray(np.zeros(_C.feature_distance_workspace(1, 2)))
    _C.feature_distance(xs, ys, None, loss, None, "none", "mse", 1.0, stream=STREAM, workspace=ws,
                        kernels=emu.kernels)
    np.testing.assert_allclose(loss.array, cpu_feature_distance(x, y, None, "none", "mse", 1.0)[0], rtol=1e-6)


# ---- outlier mask: windows too wide for the tiled filter -----------------------------------------


def test_wide_windows_on_a_streaming_plane_fall_back_to_the_separable_filters(emu):
    """A plane too large for the one-block path with windows whose halo does not fit the
    tiled filter's shared memory (closing = opening = 161 on 256 x 256): v2 runs the
    separable filters of the 0.2 sequence for that call, and the mask is still the CPU's."""
    from test_cuda_emulated import emu_outlier_mask

    y = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(4))
    y[0, 0, 100:140, 30:70] += 8.0
    emu.clear()
    keep, stats = emu_outlier_mask(emu, y, 161, 161)
    want_keep, want_stats = cpu_outlier_mask(y, 161, 161)
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(stats, want_stats, rtol=1e-12)
    kernels = {ln["kernel"] for ln in emu.launches() if ln["kind"] == "launch"}
    assert "lpl_v1_om_col_or" in kernels
    emu.check_clean()
