"""The CUDA kernels of csrc/cuda/ executed on the emulated device (docs/cuda.md, "The
emulated device"), on every machine: lpl_ext's CUDA host path (feature_distance_cuda.c,
outlier_mask_cuda.c) picks every launch configuration and packs every argument as on a
GPU; the stand-in driver (tests/fake_cuda/fake_libcuda.c) enforces the device's launch
limits and runs each kernel, every CUDA thread a fiber (an OS thread in the
ThreadSanitizer build), blocks one at a time in a seeded shuffled order.

Compared with the CPU kernels through the same _C entry points, on CUDA-labelled DLPack
capsules over host memory:
- keep-masks bit-identical; the outlier ratio bit-identical; the layer mean and std
  bit-identical too on both v2 paths (the plane path, a plane in shared memory, and the
  streaming path of planes too large for it: both sum in the one reduction order of
  lpl_kernel_abi.h that the CPU follows), within reduction order on v1, and bit-identical
  everywhere when the partial sums are exact;
- gradients bit-identical (the per-element math is the same, lpl_math.h, in the same
  order), except for norm="batch", whose channel mean and std come from partial moments
  merged in another order (v2: per chunk of LPL_FD_STATS_CHUNK values, Chan's merge; v1:
  per plane in block-reduction order): within a few units in the last place of the
  storage dtype (bit-identical again when those sums are exact);
- the v2 feature-distance kernels read x, y and the mask once per element and write the
  gradient once (test_v2_reads_each_input_once pins their exact traffic);
- losses within reduction order (sums of identical per-element terms, in another order
  than the CPU's); for the current kernels (v2: per-block partials added in a fixed
  order, no floating atomics) bit-identical run to run in any block order, for the 0.2
  kernels (v1: double atomics) within reduction order;
- a copy of the target gives exactly 0 (tests/test_exact_zero.py's cases).

Modes: the default is the quick subset CI runs; LPL_EMU_FULL=1 runs the whole grid;
tests/emu/run_sanitized.sh sets LPL_EMU_SANITIZE=thread|address and runs the sanitizer
subset under ThreadSanitizer or AddressSanitizer + UBSan."""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

import lpl_ext
from fake_cuda.build import KERNEL_FILES, ROOT, build as build_fake_libcuda, build_dir
from lpl_ext import _C, _cuda
from lpl_ext._options import DISTANCES, NORMS  # the C module's lists
from reference import ref_feature_distance, ref_outlier_mask
from test_cuda_loader import FakeCudaArray
from test_exact_zero import copy_of_target
from test_nonfinite import SHAPE as NONFINITE_SHAPE, _data as nonfinite_data

SANITIZE = os.environ.get("LPL_EMU_SANITIZE") or None
MODE = "full" if os.environ.get("LPL_EMU_FULL") == "1" else ("sanitize" if SANITIZE else "quick")
STREAM = 0x5EED  # any handle: the stand-in runs launches in order on the calling thread

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
EPS = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# Relative tolerance of a loss: the same per-element terms (all >= 0: no cancellation),
# which the device adds one by one in double and the CPU row by row in its accumulation
# type (float for 32- and 16-bit storage, feature_distance_cpu_impl.h) before double.
# Summing n terms >= 0 in precision u is off by at most (n - 1) u of the sum (Higham).
LOSS_RTOL = 1e-12


def loss_rtol(dtype: torch.dtype, hw: int, norm: str, kernel_set: str = "v2") -> float:
    if dtype == torch.float64:
        return LOSS_RTOL
    # batch, and default / shared on the v1 kernels: the terms themselves may differ by a few
    # float ulps (their gradients' exception in assert_gradient_matches_cpu); measured up to
    # 4 ulps of the loss on v1's 4,100-channel planes (LPL_EMU_FULL=1)
    terms_differ = norm == "batch" or (kernel_set == "v1" and norm in ("default", "shared"))
    return max(hw - 1, 1) * 2.0 ** -24 + (16 * 2.0 ** -24 if terms_differ else 0.0)


def _dtype_id(d: torch.dtype) -> str:
    return str(d).split(".")[-1]


# ---- the emulated device ------------------------------------------------------------------


class Emu:
    """The stand-in driver with the emulated device, its kernels loaded for cuda:0 (with
    the default 132 SMs, and with 1 SM, which makes the host code choose 256-thread
    blocks), and a reader of its launch log."""

    def __init__(self, lib: Path, log: Path, kernels, kernels_1sm, origin: str):
        self.lib, self.log, self.kernels, self.kernels_1sm, self.origin = lib, log, kernels, kernels_1sm, origin
        self.hooks = ctypes.CDLL(str(lib))
        self.hooks.fake_warning.restype = ctypes.c_char_p

    def name(self, kernel: str) -> str:
        """The exported symbol of `kernel` (e.g. "fd_main_f32") in this device's kernel set."""
        return "lpl_" + ("v1_" if self.kernel_set == "v1" else "") + kernel

    def launches(self) -> List[Dict[str, str]]:
        """Every launch logged since clear(): {"kernel": name, field: value}."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            kind, name, *fields = line.split()
            if kind in ("launch", "refused"):
                out.append({"kind": kind, "kernel": name, **dict(f.split("=", 1) for f in fields)})
        return out

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)
        self.hooks.fake_clear_warnings()

    def warnings(self) -> List[str]:
        return [self.hooks.fake_warning(i).decode() for i in range(self.hooks.fake_warning_count())]

    def check_clean(self) -> None:
        """Every launch since clear() ran (none refused or failed) and raised no warning."""
        bad = [ln for ln in self.launches() if ln["kind"] != "launch" or ln.get("rc") != "0"]
        assert not bad, bad
        assert self.warnings() == []


def _image_for_emulation() -> Tuple[Optional[bytes], str]:
    """The shipped sm_90 cubin (the stand-in reads each kernel's static shared memory and
    launch bounds from it), else None: lpl_ext's own image choice then finds one."""
    name = Path(lpl_ext.__file__).parent / "_kernels" / "lpl_kernels.sm_90.cubin"
    return (name.read_bytes(), "shipped cubin sm_90") if name.is_file() else (None, "")


#: Both kernel sets run the parity tests (LPL_EXT_KERNEL_SET: the current kernels and the
#: 0.2 ones kept for the GPU comparison); the sanitizer subsets run the current set.
KERNEL_SETS = ["v2"] if SANITIZE else ["v2", "v1"]

#: Grid tests that the quick subset runs for v1 as well (the others run for v2 only).
#: (test name -> stride: every stride-th case of its grid; the feature-distance grid keeps its
#: "odd" shape instead.)
V1_QUICK_GRIDS = {"test_feature_distance_matches_cpu": 1, "test_copy_of_target_gives_exact_zero": 4,
                  "test_nonfinite_inputs_match_cpu": 4, "test_outlier_mask_matches_cpu": 4}


def deselect_in_quick_mode(item: pytest.Item) -> bool:
    """Whether the quick subset leaves out this collected test (tests/conftest.py deselects it,
    so the summary counts it as deselected, never as passed or skipped).

    v1 is the frozen 0.2 code (no edits but names), which passed the whole quick subset
    before v2 landed; the quick subset keeps every non-grid v1 test (launch limits, shared
    memory, barriers, bytes) and thins its grids: the "odd" feature-distance shape in full
    (every dtype, norm, distance, mask) and a fixed quarter of the exact-zero, non-finite
    and outlier-mask grids, by position in the grid. LPL_EMU_FULL=1 runs everything."""
    callspec = getattr(item, "callspec", None)
    if MODE != "quick" or callspec is None or callspec.params.get("emu") != "v1":
        return False
    stride = V1_QUICK_GRIDS.get(item.originalname)
    if stride is None:
        return False
    if item.originalname == "test_feature_distance_matches_cpu":
        return callspec.params["shape_name"] != "odd"
    return _grid_position(item) % stride != 0


def _grid_position(item: pytest.Item) -> int:
    """Position of the test's case in its parametrize grid (its index along that decorator)."""
    callspec = item.callspec
    # every parameter of one parametrize decorator shares the same index
    names = [n for n in callspec.indices if n != "emu"]
    return callspec.indices[names[0]]


@pytest.fixture(scope="module", params=KERNEL_SETS)
def emu(request, tmp_path_factory) -> Emu:
    # LPL_EMU_CSRC: kernel sources from another tree (tests/emu/mutation_check.py's mutants)
    lib = build_fake_libcuda(build_dir(tmp_path_factory.getbasetemp()), SANITIZE,
                             Path(os.environ.get("LPL_EMU_CSRC") or ROOT / "csrc"))
    log = tmp_path_factory.mktemp("emulated") / "launches.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LPL_EXT_LIBCUDA", str(lib))
        mp.setenv("FAKE_CUDA_LOG", str(log))
        for var in ("FAKE_CUDA_CC", "FAKE_CUDA_DEVICES", "FAKE_CUDA_SMS", "FAKE_CUDA_REJECT_CUBIN",
                    "FAKE_CUDA_INIT_ERROR", "FAKE_CUDA_SEED", "FAKE_CUDA_FOOTPRINT", "LPL_EXT_KERNELS"):
            mp.delenv(var, raising=False)
        mp.setattr(_cuda, "_state", {"driver": None, "kernels": {}, "nvrtc": None})
        image, origin = _image_for_emulation()
        if image is None:
            kernels, origin = _cuda.load_kernels(0, request.param)  # NVRTC (skips would be a CI failure)
            mp.setenv("FAKE_CUDA_SMS", "1")
            kernels_1sm, _ = _cuda.load_kernels(0, request.param)
        else:
            drv = _cuda.driver()
            code = _cuda.KERNEL_SETS[request.param]
            kernels = _C.cuda_load_kernels(drv, 0, image, code)
            mp.setenv("FAKE_CUDA_SMS", "1")  # read when the kernels are loaded (their sm_count)
            kernels_1sm = _C.cuda_load_kernels(drv, 0, image, code)
        mp.delenv("FAKE_CUDA_SMS")
        device = Emu(lib, log, kernels, kernels_1sm, origin)
        device.kernel_set = request.param
        del kernels, kernels_1sm
        yield device
        # release the modules and the primary context (tests/test_cuda_loader.py counts them
        # on the same stand-in)
        device.kernels = device.kernels_1sm = None
        gc.collect()


@pytest.fixture
def dev(emu, monkeypatch) -> Emu:
    """The emulated device with a clean log; each test ends with no refused or failed
    launch and no warning."""
    monkeypatch.delenv("FAKE_CUDA_SEED", raising=False)
    emu.clear()
    yield emu
    emu.check_clean()


# ---- running an op on both devices -----------------------------------------------------------


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


def _on_device(t: torch.Tensor) -> FakeCudaArray:
    """The tensor's values in host memory labelled cuda:0 (bfloat16 as raw 16-bit words)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return FakeCudaArray(t.view(torch.int16).numpy().view(np.uint16), bfloat16=True)
    return FakeCudaArray(t.numpy())


def _storage(dtype: torch.dtype) -> np.dtype:
    return {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
            torch.bfloat16: np.uint16}[dtype]


def _values(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values of raw storage (bfloat16 words widened exactly)."""
    if dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.astype(np.float64)


def emu_feature_distance(emu: Emu, x, y, mask, norm, distance, weight, kernels=None,
                         plane_moments=None) -> Tuple[np.ndarray, np.ndarray]:
    """(loss float64 (N,), gradient in x's storage) computed on the emulated device; every
    output starts as NaN / all-ones bits, so that a value no kernel wrote shows."""
    n, c = x.shape[:2]
    loss = FakeCudaArray(np.full(n, np.nan))
    storage = np.dtype(_storage(x.dtype))
    grad = FakeCudaArray(np.full(x.numel() * storage.itemsize, 0xFF, np.uint8).view(storage).reshape(tuple(x.shape)),
                         bfloat16=x.dtype == torch.bfloat16)
    ws = FakeCudaArray(np.full(_C.feature_distance_workspace(n, c), np.nan))
    extra = {} if plane_moments is None else {"plane_moments": FakeCudaArray(np.asarray(plane_moments))}
    _C.feature_distance(_on_device(x), _on_device(y), None if mask is None else _on_device(mask), loss, grad, norm,
                        distance, weight, stream=STREAM, workspace=ws, kernels=kernels or emu.kernels, **extra)
    return loss.array, grad.array


def cpu_feature_distance(x, y, mask, norm, distance, weight, plane_moments=None) -> Tuple[np.ndarray, np.ndarray]:
    loss = torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
    grad = torch.empty_like(x)
    extra = {} if plane_moments is None else {"plane_moments": np.asarray(plane_moments)}
    _C.feature_distance(x, y, mask, loss, grad, norm, distance, weight, **extra)
    return loss.numpy(), _on_device(grad).array


def emu_outlier_mask(emu: Emu, y, closing, opening, stats=True, quantile=0.02, margin_std=2.0, moments=False):
    """(keep bytes, stats or None[, plane moments (N*C, 3) when `moments`]) on the emulated
    device; outputs start as bytes no kernel writes (the moments as NaN)."""
    keep = FakeCudaArray(np.full(tuple(y.shape), 0xAB, np.uint8).view(np.bool_))  # neither 0 nor 1
    st = FakeCudaArray(np.full(3, 12345.0)) if stats else None
    ws = FakeCudaArray(np.full(_C.outlier_mask_workspace_bytes(*y.shape), 0xCD, np.uint8))
    pm = FakeCudaArray(np.full((y.shape[0] * y.shape[1], 3), np.nan)) if moments else None
    _C.outlier_mask(_on_device(y), keep, st, quantile, margin_std, closing, opening, stream=STREAM, workspace=ws,
                    kernels=emu.kernels, **({"plane_moments": pm} if moments else {}))
    out = keep.array.view(np.uint8), (st.array if stats else None)
    return out + (pm.array,) if moments else out


def cpu_outlier_mask(y, closing, opening, stats=True, quantile=0.02, margin_std=2.0, moments=False):
    keep = torch.zeros(y.shape, dtype=torch.bool)
    st = torch.zeros(3, dtype=torch.float64) if stats else None
    pm = np.full((y.shape[0] * y.shape[1], 3), np.nan) if moments else None
    _C.outlier_mask(y, keep, st, quantile, margin_std, closing, opening, **({"plane_moments": pm} if moments else {}))
    out = keep.numpy().view(np.uint8), (st.numpy() if stats else None)
    return out + (pm,) if moments else out


def assert_same_values(a_bits: np.ndarray, b_bits: np.ndarray, dtype: torch.dtype) -> None:
    """Bit-identical, except that NaNs need only be NaN at the same places (their payload
    depends on operand order, which is not part of the contract)."""
    va, vb = _values(a_bits, dtype), _values(b_bits, dtype)
    np.testing.assert_array_equal(np.isnan(va), np.isnan(vb))
    keep = ~np.isnan(vb)
    diff = np.flatnonzero(_bits(np.ascontiguousarray(a_bits))[keep] != _bits(np.ascontiguousarray(b_bits))[keep])
    assert diff.size == 0, f"{diff.size} values differ, e.g. {va[keep][diff[:5]]} vs {vb[keep][diff[:5]]}"


def assert_gradient_matches_cpu(emu: Emu, grad, want_grad, dtype: torch.dtype, norm: str,
                                sign_ties: Optional[np.ndarray] = None) -> None:
    """The gradient contract: bit-identical to the CPU, except norm="batch" (its channel
    statistics are summed in another order: 8 ulps) and, on the frozen v1 kernels, the
    `default` / `shared` norms (v1 sums a pixel's channels in channel order, the CPU since
    0.3 in lpl_math.h's chunk tree: a last-bit difference in the norm, 8 ulps). With l1 on
    those, `sign_ties` (_l1_sign_ties) marks where sign(d) itself is decided by that last
    bit: an element beyond the 8 ulps must lie there, and be one of few."""
    if norm == "batch" or (emu.kernel_set == "v1" and norm in ("default", "shared")):
        if sign_ties is not None:
            va, vb = _values(np.asarray(grad), dtype), _values(np.asarray(want_grad), dtype)
            rtol, atol = _ulp_tolerance(vb, dtype, ulps=8)
            off = np.isfinite(vb) & np.isfinite(va) & (np.abs(va - vb) > atol + rtol * np.abs(vb))
            assert not np.any(off & ~sign_ties) and off.mean() < 0.001, (np.argwhere(off & ~sign_ties), off.mean())
            grad, want_grad = np.asarray(grad)[~off], np.asarray(want_grad)[~off]
        assert_close_values(grad, want_grad, dtype, ulps=8)
    else:
        assert_same_values(grad, want_grad, dtype)


def _l1_sign_ties(x: torch.Tensor, y: torch.Tensor, norm: str) -> np.ndarray:
    """The elements (bool, x's shape) of the pixels where some channel's d = x*rx - y*ry
    (`default`) or x*s - y*s (`shared`) is within 16 float ulps of 0: there its sign, and so
    l1's gradient sign(d), is decided by the last bit of the norm, which v1 and the CPU round
    differently (channel order); `default`'s correction term then carries the flip to the
    pixel's other channels."""
    xd, yd = x.double(), y.double()
    ny = 1.0 / (yd.square().sum(1, keepdim=True).sqrt() + (1e-10 if norm == "default" else 1e-6))
    nx = 1.0 / (xd.square().sum(1, keepdim=True).sqrt() + 1e-10) if norm == "default" else ny
    a, b = xd * nx, yd * ny
    tie = (a - b).abs() <= 16 * 2.0 ** -24 * torch.maximum(a.abs(), b.abs())
    return tie.any(dim=1, keepdim=True).expand_as(x).numpy()


def _ulp_tolerance(values: np.ndarray, dtype: torch.dtype, ulps: float) -> Tuple[float, float]:
    """(rtol, atol) of `ulps` units of the storage dtype's last place, the absolute part
    relative to the largest finite magnitude of `values`."""
    scale = np.max(np.abs(values[np.isfinite(values)]), initial=0.0)
    return ulps * EPS[dtype], ulps * EPS[dtype] * scale


def assert_close_values(a_bits, b_bits, dtype: torch.dtype, ulps: float) -> None:
    """Within `ulps` units of the storage dtype's last place, relative to the largest
    magnitude (the tolerance of norm="batch" gradients)."""
    va, vb = _values(a_bits, dtype), _values(b_bits, dtype)
    np.testing.assert_array_equal(np.isnan(va), np.isnan(vb))
    fin = np.isfinite(vb)
    np.testing.assert_array_equal(va[~fin & ~np.isnan(vb)], vb[~fin & ~np.isnan(vb)])
    rtol, atol = _ulp_tolerance(vb, dtype, ulps)
    np.testing.assert_allclose(va[fin], vb[fin], rtol=rtol, atol=atol)


def assert_losses_close(a: np.ndarray, b: np.ndarray, rtol: float = LOSS_RTOL) -> None:
    """Same non-finite pattern (NaN, +Inf, -Inf do not depend on the order of the sums),
    finite values within rtol."""
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(a), test(b))
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=rtol, atol=0)


# ---- feature distance: the grid ------------------------------------------------------------------

# name: (shape, SMs the host code sees): odd sizes with 2 blocks per sample of 64 threads; one
# channel; C >= 512 on small planes; C above the shared-accumulator limit (4096: global
# atomics instead); 256-thread blocks, 8 per sample; few large planes (fd_stats splits each
# plane over 7 blocks, one per chunk); empty planes; no sample at all
FD_SHAPES = {
    "odd": ((2, 5, 9, 13), 132),
    "c1": ((3, 1, 7, 5), 132),
    "c512": ((1, 512, 3, 5), 132),
    "c4100": ((1, 4100, 1, 2), 132),
    "blocks": ((2, 3, 40, 50), 1),
    "few_planes": ((1, 2, 70, 90), 132),
    "hw0": ((2, 3, 0, 4), 132),
    "n0": ((0, 3, 4, 4), 132),
}
ALL_COMBOS = list(itertools.product(DTYPES, NORMS, DISTANCES, [False, True]))


def _diagonal(shift: int, count: int = 4) -> list:
    """`count` combinations that cover every norm (and, with 4, every dtype, both distances
    and mask / no mask)."""
    return [(DTYPES[(i + shift) % 4], NORMS[i], DISTANCES[(i + shift) % 2], bool((i // 2 + shift) % 2))
            for i in range(count)]


def _fd_grid() -> list:
    cases = []
    for k, name in enumerate(FD_SHAPES):
        if MODE == "full":
            combos = ALL_COMBOS
        elif MODE == "quick":
            combos = ALL_COMBOS if name == "odd" else _diagonal(k, 2 if name == "c4100" else 4)
        else:  # sanitizers: every kernel on a few shapes (each emulated thread costs more there)
            if name in ("c4100", "n0"):
                continue
            combos = _diagonal(k, 4 if name in ("odd", "blocks") else 1)
        cases += [pytest.param(name, *c, id=f"{name}-{_dtype_id(c[0])}-{c[1]}-{c[2]}-{'mask' if c[3] else 'nomask'}")
                  for c in combos]
    return cases


def _fd_inputs(shape, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    scale = torch.logspace(-2, 2, max(c, 1), dtype=torch.float64)[:c].view(1, c, 1, 1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(shape, generator=g) > 0.3
        if n and c > 1:
            mask[0, 0] = False  # a plane with nothing kept contributes 0
    return x, y, mask


@pytest.mark.parametrize("shape_name,dtype,norm,distance,masked", _fd_grid())
def test_feature_distance_matches_cpu(dev, shape_name, dtype, norm, distance, masked):
    shape, sms = FD_SHAPES[shape_name]
    x, y, mask = _fd_inputs(shape, dtype, masked)
    kernels = dev.kernels_1sm if sms == 1 else None
    loss, grad = emu_feature_distance(dev, x, y, mask, norm, distance, 0.75, kernels)
    want_loss, want_grad = cpu_feature_distance(x, y, mask, norm, distance, 0.75)
    ties = (_l1_sign_ties(x, y, norm) if dev.kernel_set == "v1" and distance == "l1" and
            norm in ("default", "shared") and x.numel() else None)
    assert_gradient_matches_cpu(dev, grad, want_grad, dtype, norm, ties)
    assert_losses_close(loss, want_loss, rtol=loss_rtol(dtype, shape[2] * shape[3], norm, dev.kernel_set))
    if dtype == torch.float64 and shape[0] and shape[2]:
        ref = ref_feature_distance(x, y, mask, norm, distance, 0.75).numpy()
        np.testing.assert_allclose(loss, ref, rtol=1e-9, atol=1e-300)
    if shape[0] and shape[2]:
        assert dev.name(f"fd_main_{SUFFIX[dtype]}") in {ln["kernel"] for ln in dev.launches()}


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_batch_norm_gradient_is_bit_identical_when_its_statistics_are_exact(dev, dtype, masked):
    """Dyadic values on planes of 64: every per-plane sum and the mean are exact in any
    order, so norm="batch" is bit-identical too (its tolerance above is only the order of
    the statistics' sums)."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 8, 8)
    x = (torch.randint(-24, 25, shape, generator=g).double() / 8).to(dtype)
    y = (torch.randint(-24, 25, shape, generator=g).double() / 8).to(dtype)
    mask = torch.rand(shape, generator=g) > 0.3 if masked else None
    for distance in DISTANCES:
        loss, grad = emu_feature_distance(dev, x, y, mask, "batch", distance, 1.0)
        want_loss, want_grad = cpu_feature_distance(x, y, mask, "batch", distance, 1.0)
        assert_same_values(grad, want_grad, dtype)
        assert_losses_close(loss, want_loss, rtol=loss_rtol(dtype, 64, "none"))


def test_channels_beyond_shared_memory_and_loss_only(dev):
    """v2, C = 2000 float64, norm="default", masked: no tile of 8 pixels fits in shared memory,
    so the main kernel reads global memory instead (blocks of one pixel per thread); and
    the loss without a gradient (the mask bytes instead of the packed bits) equals the
    loss with one."""
    if dev.kernel_set != "v2":
        pytest.skip("the v2 kernels' fallback")
    shape = (1, 2000, 3, 3)
    x, y, mask = _fd_inputs(shape, torch.float64, True)
    loss, grad = emu_feature_distance(dev, x, y, mask, "default", "mse", 0.75)
    want_loss, want_grad = cpu_feature_distance(x, y, mask, "default", "mse", 0.75)
    assert_same_values(grad, want_grad, torch.float64)
    assert_losses_close(loss, want_loss)
    main = [ln for ln in dev.launches() if ln["kernel"] == dev.name("fd_main_f64")]
    assert int(main[0]["block"]) == 32  # the unstaged path
    alone = FakeCudaArray(np.full(1, np.nan))
    ws = FakeCudaArray(np.full(_C.feature_distance_workspace(*shape[:2]), np.nan))
    _C.feature_distance(_on_device(x), _on_device(y), _on_device(mask), alone, None,
                        "default", "mse", 0.75, stream=STREAM, workspace=ws, kernels=dev.kernels)
    np.testing.assert_array_equal(_bits(alone.array), _bits(loss))


def test_statistics_of_few_planes_run_in_many_blocks(dev):
    """v2: a layer of 2 planes of 6300 values has 7 statistics chunks per plane; fd_stats
    runs one block per chunk (14 blocks, not 2 x 4), and `batch` statistics merged from
    7 parts per plane still give the CPU's loss and gradient."""
    if dev.kernel_set != "v2":
        pytest.skip("the v2 statistics pass")
    x, y, mask = _fd_inputs((1, 2, 70, 90), torch.float32, True)
    dev.clear()
    loss, grad = emu_feature_distance(dev, x, y, mask, "batch", "mse", 0.75)
    stats = [ln for ln in dev.launches() if ln["kernel"] == dev.name("fd_stats_f32")]
    assert [int(ln["grid"]) for ln in stats] == [14]
    want_loss, want_grad = cpu_feature_distance(x, y, mask, "batch", "mse", 0.75)
    assert_close_values(grad, want_grad, torch.float32, ulps=8)
    assert_losses_close(loss, want_loss, rtol=loss_rtol(torch.float32, 6300, "batch"))


def _chunk_order_inputs(hw: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, y of shape (1, 8, 1, hw): one channel per chunk of lpl_math.h's per-pixel order;
    y's squares are 1 in chunk 0 and 2^-24 in the others, so that adding the chunks in
    sequence (1 + 2^-24 rounds back to 1, seven times) and by the pairwise tree
    (1 + 3 * 2^-23) give different float32 norms; x is y scaled by 3/4 (default: the same
    for ||x|| and sum_c g_c x_c)."""
    y = torch.full((1, 8, 1, hw), 2.0 ** -12, dtype=torch.float64)
    y[:, 0] = 1.0
    y = y.to(dtype)
    return (y.double() * 0.75).to(dtype), y


@pytest.mark.parametrize("hw,groups", [(300, 1), (100, 2), (40, 4), (9, 8)])
@pytest.mark.parametrize("norm", ["shared", "default"])
def test_per_pixel_sums_follow_the_chunk_tree_at_every_group_count(dev, hw, groups, norm):
    """v2 sums a pixel's channels in up to 8 thread groups (tiles of 256 / 128 / 64 / 16
    pixels here: 1, 2, 4 and 8 groups); the per-pixel norms, hence the gradient, must be
    the CPU's bits, on inputs where a sequential sum of the chunks differs from the tree."""
    if dev.kernel_set != "v2":
        pytest.skip("v1 sums one pixel per thread in channel order")
    chunks = np.array([1.0] + [2.0 ** -24] * 7, dtype=np.float32)
    sequential = np.float32(0)
    for v in chunks:
        sequential = np.float32(sequential + v)
    tree = chunks.copy()
    for w in (1, 2, 4):
        tree[0::2 * w] = tree[0::2 * w] + tree[w::2 * w]
    assert sequential != tree[0]  # the inputs tell the two orders apart
    x, y = _chunk_order_inputs(hw, torch.float32)
    loss, grad = emu_feature_distance(dev, x, y, None, norm, "mse", 0.75)
    want_loss, want_grad = cpu_feature_distance(x, y, None, norm, "mse", 0.75)
    assert_same_values(grad, want_grad, torch.float32)
    assert_losses_close(loss, want_loss, rtol=loss_rtol(torch.float32, hw, norm, dev.kernel_set))
    main = [ln for ln in dev.launches() if ln["kernel"] == dev.name("fd_main_f32")]
    assert int(main[0]["block"]) == 256  # the staged path: 256 / P thread groups per tile


def _exact_zero_grid() -> list:
    combos = itertools.product(DTYPES, NORMS, DISTANCES, [False, True])
    if MODE == "sanitize":
        combos = _diagonal(1)
    return [pytest.param(*c, id=f"{_dtype_id(c[0])}-{c[1]}-{c[2]}-{'mask' if c[3] else 'nomask'}") for c in combos]


@pytest.mark.parametrize("dtype,norm,distance,masked", _exact_zero_grid())
def test_copy_of_target_gives_exact_zero(dev, dtype, norm, distance, masked):
    x, y, mask = copy_of_target(dtype, masked)
    loss, grad = emu_feature_distance(dev, x, y, mask, norm, distance, 0.75)
    assert np.all(loss == 0.0), loss
    assert np.all(_values(grad, dtype) == 0.0)


def _nonfinite_grid() -> list:
    kinds = ["kept", "dropped", "plane_dropped"]
    combos = list(itertools.product(DTYPES, NORMS, DISTANCES, kinds))
    if MODE == "quick":
        combos = [c for i, c in enumerate(combos) if i % 3 == 0]  # 32 of 96, every value of each axis
    elif MODE == "sanitize":
        combos = [(DTYPES[i % 4], NORMS[i], DISTANCES[i % 2], kinds[i % 3]) for i in range(4)]
    return [pytest.param(*c, id=f"{_dtype_id(c[0])}-{c[1]}-{c[2]}-{c[3]}") for c in combos]


@pytest.mark.parametrize("dtype,norm,distance,mask_kind", _nonfinite_grid())
def test_nonfinite_inputs_match_cpu(dev, dtype, norm, distance, mask_kind):
    """tests/test_nonfinite.py's data with NaN, +Inf and -Inf in x (one per sample) and in
    y, kept or dropped by the mask, or in a plane the mask drops whole."""
    x, y = nonfinite_data(dtype)
    bad_x = [(0, 1, 2, 3), (1, 2, 0, 0), (2, 3, 5, 6)]
    bad_y = [(1, 0, 1, 1), (2, 1, 4, 4), (0, 3, 0, 6)]
    for pos, v in zip(bad_x, (float("nan"), float("inf"), -float("inf"))):
        x[pos] = v
    for pos, v in zip(bad_y, (float("inf"), float("nan"), -float("inf"))):
        y[pos] = v
    mask = None
    if mask_kind != "kept":
        mask = torch.ones(NONFINITE_SHAPE, dtype=torch.bool)
        for pos in bad_y + ([bad_x[1]] if mask_kind == "dropped" else []):
            mask[pos] = False
        if mask_kind == "plane_dropped":
            mask[bad_x[0][:2]] = False
    loss, grad = emu_feature_distance(dev, x, y, mask, norm, distance, 1.0)
    want_loss, want_grad = cpu_feature_distance(x, y, mask, norm, distance, 1.0)
    assert_losses_close(loss, want_loss, rtol=loss_rtol(dtype, NONFINITE_SHAPE[2] * NONFINITE_SHAPE[3], norm, dev.kernel_set))
    assert_gradient_matches_cpu(dev, grad, want_grad, dtype, norm)
    assert not np.all(np.isfinite(loss))  # the policy of tests/test_nonfinite.py: nothing hides a bad x


def test_block_order_changes_no_result(dev, monkeypatch):
    """Three block orders (grid order and two shuffles): gradients, masks and outlier
    statistics bit-identical (per-block partials are combined in a fixed order); the loss
    bit-identical too for v2 (per-block partials), within reduction order for v1 (double
    atomics)."""
    x, y, mask = _fd_inputs(FD_SHAPES["blocks"][0], torch.float32, True, seed=5)
    ym = torch.randn(1, 2, 50, 60, generator=torch.Generator().manual_seed(2)) * 3  # 2 blocks per plane
    results = []
    for seed in ("0", "1", "2"):
        monkeypatch.setenv("FAKE_CUDA_SEED", seed)
        loss, grad = emu_feature_distance(dev, x, y, mask, "default", "mse", 1.0, dev.kernels_1sm)
        keep, stats = emu_outlier_mask(dev, ym, 3, 5)
        results.append((loss, grad, keep, stats))
    grids = {ln["kernel"]: int(ln["grid"]) for ln in dev.launches()}
    om_blocks = grids[dev.name("om_plane_f32")] if dev.kernel_set == "v2" else grids[dev.name("om_moments_f32")] // 2
    assert grids[dev.name("fd_main_f32")] == 2 * 8 and om_blocks == 2  # blocks to reorder: one (v1: two) per plane
    for loss, grad, keep, stats in results[1:]:
        if dev.kernel_set == "v1":
            assert_losses_close(loss, results[0][0])  # both summed in double, in other orders
        else:
            np.testing.assert_array_equal(_bits(loss), _bits(results[0][0]))
        np.testing.assert_array_equal(_bits(grad), _bits(results[0][1]))
        np.testing.assert_array_equal(keep, results[0][2])
        np.testing.assert_array_equal(_bits(stats), _bits(results[0][3]))


# ---- outlier mask -------------------------------------------------------------------------------


def _om_input(case: str, dtype: torch.dtype) -> Tuple[torch.Tensor, int, int]:
    """(y, closing, opening) of a named case."""
    g = torch.Generator().manual_seed(11)
    if case == "nonfinite":  # tests/test_nonfinite.py's pipeline case
        y = torch.randn(2, 3, 16, 16, generator=g).to(dtype)
        y[0, 0, 3, 3] = float("nan")
        y[0, 1, 8, 2] = float("inf")
        y[1, 2, 0, 15] = -float("inf")
        y[1, 0] = float("nan")  # a plane with no finite value keeps nothing
        return y, 3, 5
    shape, closing, opening = {"odd": ((2, 3, 9, 13), 3, 5), "c1": ((1, 1, 17, 11), 1, 1),
                               "blocks": ((1, 2, 50, 60), 3, 3), "tiny": ((2, 2, 1, 1), 3, 5),
                               "constant": ((1, 2, 7, 6), 3, 5), "hw0": ((1, 2, 0, 5), 3, 5),
                               "wide": ((1, 2, 6, 9), 9, 13),  # windows wider than the plane
                               # planes too large for shared memory: the streaming path (v2)
                               "streaming": ((1, 2, 256, 240), 5, 7),
                               # C = 1, odd sides: edge tiles of both the 32 x 64 reduction
                               # tiles and the filter's, on the streaming path in every dtype
                               "streaming_odd": ((1, 1, 161, 389), 3, 5)}[case]
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    if y.numel() > 8:
        y.view(-1)[:: 7] *= 6  # outliers to drop
    if case == "constant":
        y[0, 0] = 0.375  # a constant plane: std exactly 0
    if case == "streaming":
        y[0, 0, 0, :7] = float("nan")  # not finite at a tile corner and along the border
        y[0, 1, 100, 130] = float("inf")
    if case == "streaming_odd":
        y.view(-1)[3::997] = float("nan")
        y[0, 0, 160, 388] = float("inf")  # the last value of the last (partial) tile
        y[0, 0, 64:96, 128:192] = float("-inf")  # a whole reduction tile with no finite value
    return y.to(dtype), closing, opening


OM_CASES = ["odd", "c1", "blocks", "nonfinite", "tiny", "constant", "hw0", "wide", "streaming", "streaming_odd"]


def _om_grid() -> list:
    combos = list(itertools.product(OM_CASES, DTYPES))
    if MODE == "sanitize":
        combos = [(c, DTYPES[i % 4]) for i, c in enumerate(["odd", "blocks", "nonfinite", "tiny", "streaming"])]
    return [pytest.param(c, d, id=f"{c}-{_dtype_id(d)}") for c, d in combos]


@pytest.mark.parametrize("case,dtype", _om_grid())
def test_outlier_mask_matches_cpu(dev, case, dtype):
    y, closing, opening = _om_input(case, dtype)
    keep, stats = emu_outlier_mask(dev, y, closing, opening)
    want_keep, want_stats = cpu_outlier_mask(y, closing, opening)
    np.testing.assert_array_equal(keep, want_keep)
    if y.numel():  # (the oracle's max_pool2d refuses empty planes)
        np.testing.assert_array_equal(keep, ref_outlier_mask(y, 0.02, 2.0, closing, opening).numpy())
    launched = {ln["kernel"] for ln in dev.launches()}
    if dev.kernel_set == "v2" and y.numel():
        assert (dev.name(f"om_hist_{SUFFIX[dtype]}") in launched) == case.startswith("streaming"), launched
    # the outlier ratio is 1 - kept / n (integers): exact; mean and std: bit-identical on
    # both v2 paths (the CPU's reduction order), within reduction order on v1
    np.testing.assert_array_equal(_bits(stats[2:]), _bits(want_stats[2:]))
    if dev.kernel_set == "v2":
        np.testing.assert_array_equal(_bits(stats), _bits(want_stats))
    elif case.startswith("streaming"):  # a mean near 0 from cancelling sums: its error scales with the std
        np.testing.assert_allclose(stats[:2], want_stats[:2], rtol=1e-12, atol=1e-12 * abs(want_stats[1]))
    else:
        assert_losses_close(stats[:2], want_stats[:2])
    if case == "odd":  # without stats the same keep-mask, and fewer launches
        dev.clear()
        keep2, _ = emu_outlier_mask(dev, y, closing, opening, stats=False)
        np.testing.assert_array_equal(keep2, want_keep)
        assert dev.name("om_layer_stats") not in {ln["kernel"] for ln in dev.launches()}


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """lpl_math.h's order-preserving keys of float32 / float64 values (uint64)."""
    bits = values.view(np.uint32 if values.dtype == np.float32 else np.uint64).astype(np.uint64)
    sign = np.uint64(1 << (8 * values.itemsize - 1))
    full = np.uint64((1 << (8 * values.itemsize)) - 1)
    return np.where(bits & sign, ~bits & full, bits | sign)


@pytest.mark.parametrize("dtype", [torch.float32] if MODE == "sanitize" else [torch.float32, torch.float64],
                         ids=_dtype_id)
def test_streaming_select_reads_candidate_lists_where_they_fit(dev, dtype):
    """v2 streaming path, candidate gather (LPL_OM_CAND_DIVISOR in lpl_kernel_abi.h). Plane 0
    is spread out: after the first digits the bins of its two order statistics hold under
    1/32 of its values, so one pass copies them into lists and the remaining digits are
    counted from the lists. Plane 1 piles its values on 9 levels (about 1/9 per bin): it
    keeps re-reading the plane. Both planes' selected keys are the exact order statistics,
    mask and stats the CPU's, and from the third digit pass on only plane 1 is read."""
    if dev.kernel_set != "v2":
        pytest.skip("the v2 kernels' streaming select")
    g = torch.Generator().manual_seed(5)
    y = torch.randn(1, 2, 256, 256, generator=g, dtype=torch.float64)
    y[0, 1] = torch.randint(-4, 5, (256, 256), generator=g).double() / 4
    y = y.to(dtype)
    planes, length = 2, 256 * 256
    ws = FakeCudaArray(np.full(_C.outlier_mask_workspace_bytes(*y.shape), 0xCD, np.uint8))
    keep = FakeCudaArray(np.zeros(tuple(y.shape), np.uint8).view(np.bool_))
    stats = FakeCudaArray(np.zeros(3))
    _C.outlier_mask(_on_device(y), keep, stats, 0.02, 2.0, 3, 5, stream=STREAM, workspace=ws, kernels=dev.kernels)
    want_keep, want_stats = cpu_outlier_mask(y, 3, 5)
    np.testing.assert_array_equal(keep.array.view(np.uint8), want_keep)
    np.testing.assert_array_equal(_bits(stats.array), _bits(want_stats))
    # the selected keys (plane_u slots 0, 1 after the last digit; lpl_om_workspace_layout:
    # plane_u follows plane_d's 16 doubles per plane, 256-byte aligned)
    plane_u = (planes * 16 * 8 + 255) // 256 * 256
    selected = ws.array[plane_u:plane_u + planes * 8 * 8].view(np.uint64).reshape(planes, 8)[:, :2]
    values = y.reshape(planes, length).numpy()
    for p in range(planes):
        ranks = [min(max(int(np.floor(length * q)), 1), length) for q in (0.02, 1 - 0.02)]
        np.testing.assert_array_equal(selected[p], _sort_keys(np.sort(values[p])[[r - 1 for r in ranks]]))
    hists = [ln for ln in dev.launches() if ln["kernel"] == dev.name(f"om_hist_{SUFFIX[dtype]}")]
    assert len(hists) == {torch.float32: 3, torch.float64: 6}[dtype]
    plane_bytes = length * y.element_size()
    assert all(int(ln["read"]) >= planes * plane_bytes for ln in hists[:2])
    assert all(plane_bytes <= int(ln["read"]) < 1.05 * plane_bytes for ln in hists[2:]), [ln["read"] for ln in hists]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_outlier_stats_are_bit_identical_when_the_sums_are_exact(dev, dtype):
    """Dyadic values on 2 planes of 64: every partial sum is exact in any order, so the
    layer mean and std are bit-identical too."""
    g = torch.Generator().manual_seed(4)
    y = (torch.randint(-32, 33, (1, 2, 8, 8), generator=g).double() / 8).to(dtype)
    y[0, 0, 2, 5] = 100.0  # beyond the 98% quantile + 2 std: dropped (windows of 1: no closing)
    keep, stats = emu_outlier_mask(dev, y, 1, 1)
    want_keep, want_stats = cpu_outlier_mask(y, 1, 1)
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_array_equal(_bits(stats), _bits(want_stats))
    assert 0 < stats[2] < 1


# ---- the outlier mask's plane moments, taken by the feature distance --------------------------------

# cases of _om_input (the one-block path, empty and non-finite planes, windows wider than the
# plane, both streaming shapes) and the brief's 1 x 2 x 256 x 256 streaming layer
PM_CASES = ["odd", "c1", "nonfinite", "constant", "hw0", "wide", "streaming", "streaming_odd", "streaming_256"]


def _pm_input(case: str, dtype: torch.dtype) -> Tuple[torch.Tensor, int, int]:
    if case != "streaming_256":
        return _om_input(case, dtype)
    y = torch.randn((1, 2, 256, 256), generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    y.view(-1)[::13] *= 7
    y[0, 1, 40:72, 100:180] = 9.0  # a block of outliers (closed, then opened away)
    return y.to(dtype), 3, 5


def _pm_grid() -> list:
    combos = list(itertools.product(PM_CASES, DTYPES))
    if MODE != "full":  # every case, every dtype on the two paths' main cases
        combos = [(c, d) for i, (c, d) in enumerate(combos) if c in ("odd", "streaming_256") or i % 3 == 0]
    if MODE == "sanitize":
        combos = [("odd", torch.float32), ("streaming", torch.float16)]
    return [pytest.param(c, d, id=f"{c}-{_dtype_id(d)}") for c, d in combos]


@pytest.mark.parametrize("case,dtype", _pm_grid())
def test_outlier_plane_moments_match_cpu(dev, case, dtype):
    """plane_moments on both v2 paths (one block per plane; the streaming path, whose tile
    partials om_plane_merge combines): the CPU's bits, with and without the layer statistics
    (which do not change), and torch's values within rounding. v1 refuses them."""
    y, closing, opening = _pm_input(case, dtype)
    if dev.kernel_set == "v1":
        with pytest.raises(RuntimeError, match="plane_moments: not produced by the 0.2 outlier-mask kernels"):
            emu_outlier_mask(dev, y, closing, opening, moments=True)
        dev.clear()  # (the refused call launched nothing)
        return
    want_keep, want_stats, want_pm = cpu_outlier_mask(y, closing, opening, moments=True)
    for stats in (True, False):
        dev.clear()
        keep, st, pm = emu_outlier_mask(dev, y, closing, opening, stats=stats, moments=True)
        np.testing.assert_array_equal(keep, want_keep)
        if not y.numel():  # nothing to launch: left to the caller (lpl_ext._launch zeroes them)
            assert np.isnan(pm).all() and not want_pm.any()
            continue
        np.testing.assert_array_equal(_bits(pm), _bits(want_pm))
        if stats:
            np.testing.assert_array_equal(_bits(st), _bits(want_stats))
        launched = {ln["kernel"] for ln in dev.launches()}
        if y.numel():
            assert (dev.name(f"om_hist_{SUFFIX[dtype]}") in launched) == case.startswith("streaming"), launched
            assert (dev.name("om_plane_merge") in launched) == case.startswith("streaming")
    if y.numel():
        from test_outlier_mask import torch_plane_moments

        want = torch_plane_moments(y, torch.from_numpy(want_keep.astype(bool))).numpy()
        np.testing.assert_array_equal(want_pm[:, 2], want[:, 2])
        spread = np.sqrt(want[:, 1].max())
        np.testing.assert_allclose(want_pm[:, 0], want[:, 0], rtol=0, atol=1e-12 * spread)
        np.testing.assert_allclose(want_pm[:, 1], want[:, 1], rtol=1e-11, atol=1e-300)


def _pm_fd_grid() -> list:
    shapes = {"n3": (3, 4, 11, 7), "blocks": (2, 3, 40, 50)}
    combos = list(itertools.product(shapes, DTYPES, NORMS, DISTANCES))
    if MODE == "quick":  # every dtype and norm on n3 (mse), the diagonal on blocks
        combos = [c for c in combos if c[0] == "n3" and c[3] == "mse"] + [
            ("blocks", *c[:3]) for c in _diagonal(1)]
    elif MODE == "sanitize":
        combos = [("n3", *c[:3]) for c in _diagonal(2)]
    return [pytest.param(shapes[s], d, n, di, id=f"{s}-{_dtype_id(d)}-{n}-{di}") for s, d, n, di in combos]


@pytest.mark.parametrize("shape,dtype,norm,distance", _pm_fd_grid())
def test_feature_distance_with_plane_moments_matches_cpu(dev, shape, dtype, norm, distance):
    """The feature distance given the outlier mask's moments: no statistics pass (v2), the
    gradient bit-identical to the CPU's with the same moments for every norm, `batch`
    included (both merge the planes' moments in the order of lpl_batch_stats_from_planes),
    losses within reduction order; and for default / shared / none the same bits as the
    call without moments (the kept counts are the same integers). The frozen v1 kernels
    ignore the moments: their usual contract."""
    g = torch.Generator().manual_seed(21)
    y = torch.randn(shape, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, shape[1]).view(1, -1, 1, 1)
    y.view(-1)[::17] *= 9
    y[0, 0] = 0.25  # a constant plane keeps nothing
    x = (y + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    y = y.to(dtype)
    keep, _, moments = cpu_outlier_mask(y, 1, 1, stats=False, moments=True)
    mask = torch.from_numpy(keep.astype(bool))
    assert 0 < int(mask.sum()) < mask.numel()
    loss, grad = emu_feature_distance(dev, x, y, mask, norm, distance, 0.75, plane_moments=moments)
    want_loss, want_grad = cpu_feature_distance(x, y, mask, norm, distance, 0.75, plane_moments=moments)
    launched = [ln["kernel"] for ln in dev.launches()]
    if dev.kernel_set == "v2":
        assert launched == [dev.name(k) for k in ("fd_setup", f"fd_main_{SUFFIX[dtype]}", "fd_finalize")]
        assert_same_values(grad, want_grad, dtype)
    else:
        assert_gradient_matches_cpu(dev, grad, want_grad, dtype, norm)
    assert_losses_close(loss, want_loss, rtol=loss_rtol(dtype, shape[2] * shape[3], norm, dev.kernel_set))
    if norm != "batch" and dev.kernel_set == "v2":
        plain_loss, plain_grad = emu_feature_distance(dev, x, y, mask, norm, distance, 0.75)
        np.testing.assert_array_equal(_bits(grad), _bits(plain_grad))
        np.testing.assert_array_equal(_bits(loss), _bits(plain_loss))


def test_plane_moments_are_checked_on_the_device(dev):
    """The C entry points refuse moments of the wrong shape or dtype, or in host memory
    for CUDA inputs, naming the argument, before any launch."""
    x, y, mask = _fd_inputs((2, 3, 5, 4), torch.float32, True)
    moments = np.zeros((6, 3))
    loss, ws = FakeCudaArray(np.zeros(2)), FakeCudaArray(np.zeros(_C.feature_distance_workspace(2, 3)))
    for pm, error, message in [
            (FakeCudaArray(np.zeros((5, 3))), ValueError, r"plane_moments: expected shape \(6, 3\)"),
            (FakeCudaArray(np.zeros((6, 3), np.float32)), TypeError, "plane_moments: expected dtype"),
            (moments, ValueError, "plane_moments: on cpu")]:
        with pytest.raises(error, match=message):
            _C.feature_distance(_on_device(x), _on_device(y), _on_device(mask), loss, None, "batch", "mse", 1.0,
                                stream=STREAM, workspace=ws, kernels=dev.kernels, plane_moments=pm)
        keep = FakeCudaArray(np.zeros(tuple(y.shape), np.bool_))
        om_ws = FakeCudaArray(np.zeros(_C.outlier_mask_workspace_bytes(*y.shape), np.uint8))
        with pytest.raises(error, match=message):
            _C.outlier_mask(_on_device(y), keep, None, 0.02, 2.0, 3, 5, stream=STREAM, workspace=om_ws,
                            kernels=dev.kernels, plane_moments=pm)
    assert dev.launches() == []


@pytest.mark.parametrize("norm", NORMS)
def test_v2_with_plane_moments_reads_y_once(dev, monkeypatch, norm):
    """With the outlier mask's moments, the v2 feature distance reads x, y and the mask once
    (fd_main: the mask bytes, no packed bits), writes the gradient once, and fd_setup reads
    the moments: the kept count per plane (masked coefficients) and, for batch, the mean and
    M2 per plane. float32."""
    if dev.kernel_set != "v2":
        pytest.skip("the v2 kernels' own traffic")
    monkeypatch.setenv("FAKE_CUDA_FOOTPRINT", "1")
    n, c, h, w = V2_READ_ONCE_SHAPE
    x, y, mask = _fd_inputs((n, c, h, w), torch.float32, True)
    moments = np.zeros((n * c, 3))
    moments[:, 2] = mask.reshape(n * c, -1).sum(1).numpy()
    moments[:, 1] = 1.0
    emu_feature_distance(dev, x, y, mask, norm, "mse", 1.0, plane_moments=moments)
    by_kernel = {ln["kernel"]: {k: int(v) for k, v in ln.items() if k not in ("kind", "kernel")}
                 for ln in dev.launches()}
    assert list(by_kernel) == [dev.name(k) for k in ("fd_setup", "fd_main_f32", "fd_finalize")]
    e, planes, batch = n * c * h * w, n * c, norm == "batch"
    main, setup = by_kernel[dev.name("fd_main_f32")], by_kernel[dev.name("fd_setup")]
    params = 8 * c * (1 + 2 * batch)  # per block (one per sample): coefficients, batch scale and shift
    assert main["read"] == (4 + 4 + 1) * e + n * params
    assert main["unique_read"] == (4 + 4 + 1) * e + 8 * planes + (16 * c if batch else 0)
    assert main["write"] == 4 * e + 8 * n
    assert setup["read"] == 8 * planes * (1 + 2 * batch)
    assert setup["write"] == 8 * planes + (16 * c if batch else 0)


# ---- bytes moved ------------------------------------------------------------------------------------


def test_bytes_are_counted_per_access(dev, monkeypatch):
    """The io helpers count every access of every thread; with FAKE_CUDA_FOOTPRINT the
    distinct bytes too. norm="none", no mask, float32, (2, 3, 4, 5), on the v1 kernels
    (whose structure these counts pin): the main kernel reads x, y and the plane's kept
    count per element and writes the gradient; each block adds its per-channel sums with
    one global atomic each."""
    if dev.kernel_set != "v1":
        pytest.skip("pins the v1 kernels' accesses (the counters); v2: test_v2_reads_each_input_once")
    monkeypatch.setenv("FAKE_CUDA_FOOTPRINT", "1")
    n, c, h, w = 2, 3, 4, 5
    x, y, _ = _fd_inputs((n, c, h, w), torch.float32, False)
    emu_feature_distance(dev, x, y, None, "none", "mse", 1.0)
    by_kernel = {ln["kernel"]: {k: int(v) for k, v in ln.items() if k not in ("kind", "kernel")}
                 for ln in dev.launches()}
    e, planes = n * c * h * w, n * c
    names = [dev.name(k) for k in ("fd_fill", "fd_main_f32", "fd_finalize")]
    assert list(by_kernel) == names
    fill, main, fin = (by_kernel[k] for k in names)
    assert (fill["read"], fill["write"], fill["unique_write"]) == (0, 8 * planes, 8 * planes)
    assert main["grid"] == n and main["block"] == 64  # 20 pixels: one 64-thread block per sample
    assert (main["read"], main["write"]) == ((4 + 4 + 8) * e, 4 * e)
    assert main["unique_read"] == (4 + 4) * e + 8 * planes
    assert main["atomic"] == 8 * planes  # one per channel and block (random data: no sum is 0)
    assert main["unique_write"] == 4 * e + 8 * planes
    assert (fin["read"], fin["write"]) == (16 * planes, 8 * n)


V2_READ_ONCE_SHAPE = (2, 6, 7, 9)  # 63 pixels: one tile of 64 lanes x 4 channel groups per sample


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_v2_reads_each_input_once(dev, monkeypatch, norm, masked):
    """The v2 kernels' traffic, exactly: x and y are read once, the gradient written once,
    the mask bytes read once (by the statistics pass, which packs them into bits that the
    main kernel reads: 1 / 8 byte per element each way); the scratch traffic is per plane,
    channel or block, never per element. float32."""
    if dev.kernel_set != "v2":
        pytest.skip("the v2 kernels' own traffic")
    monkeypatch.setenv("FAKE_CUDA_FOOTPRINT", "1")
    n, c, h, w = V2_READ_ONCE_SHAPE
    x, y, mask = _fd_inputs((n, c, h, w), torch.float32, masked)
    emu_feature_distance(dev, x, y, mask, norm, "mse", 1.0)
    by_kernel = {ln["kernel"]: {k: int(v) for k, v in ln.items() if k not in ("kind", "kernel")}
                 for ln in dev.launches()}
    e, planes, m = n * c * h * w, n * c, int(masked)
    bits = m * planes * ((h * w + 7) // 8)  # one byte per 8 values of a plane, in grad's storage
    stats = masked or norm == "batch"
    names = [dev.name(k) for k in (["fd_stats_f32", "fd_setup"] if stats else []) + ["fd_main_f32", "fd_finalize"]]
    assert list(by_kernel) == names
    main, fin = by_kernel[dev.name("fd_main_f32")], by_kernel[dev.name("fd_finalize")]
    blocks = n  # 63 pixels: one block per sample
    assert main["grid"] == blocks and main["atomic"] == 0
    # per block: the sample's plane coefficients (masked), the batch scale and shift
    params = 8 * c * (m + 2 * (norm == "batch"))
    assert main["read"] == (4 + 4) * e + bits + blocks * params
    assert main["write"] == 4 * e + 8 * blocks
    assert main["unique_read"] == (4 + 4) * e + bits + planes * 8 * m + (16 * c if norm == "batch" else 0)
    assert (fin["read"], fin["write"], fin["atomic"]) == (8 * blocks, 8 * n, 0)
    if stats:
        st, setup = by_kernel[dev.name("fd_stats_f32")], by_kernel[dev.name("fd_setup")]
        # the statistics pass: the mask (and y for batch) once, one value per plane each
        per_plane = 8 * (m + 2 * (norm == "batch"))
        assert (st["read"], st["write"], st["atomic"]) == ((m + 4 * (norm == "batch")) * e,
                                                          per_plane * planes + bits, 0)
        assert setup["read"] == per_plane * planes
        assert setup["write"] == 8 * planes * m + (16 * c if norm == "batch" else 0)


@pytest.mark.skipif(MODE == "sanitize", reason="the bytes benchmark runs unsanitized (its numbers do not depend on it)")
def test_bytes_benchmark_on_a_small_pyramid(emu, monkeypatch):
    """benchmarks/run_all.py --only emulated_bytes, on a pyramid of 2-channel layers: every
    launch is counted, requested >= distinct >= minimal bytes per element, and a masked
    layer moves its mask."""
    from benchmarks import bench_emulated_bytes, bench_head

    monkeypatch.setattr(bench_head, "LAYER_CHANNELS", (2,) * 5)
    for var in ("LPL_EXT_LIBCUDA", "FAKE_CUDA_LOG", "FAKE_CUDA_FOOTPRINT", "FAKE_CUDA_SEED"):
        monkeypatch.setenv(var, "")  # restored afterwards: the benchmark sets them for itself
    monkeypatch.setenv("LPL_EMU_BUILD_DIR", str(emu.lib.parent.parent))  # the session's build
    monkeypatch.setattr(_cuda, "_state", {"driver": None, "kernels": {}, "nvrtc": None})
    rows = bench_emulated_bytes.run(16, dtypes=("float32",), norms=("none",), log=lambda line: None,
                                    kernel_sets=(emu.kernel_set,))
    gc.collect()  # its kernels capsule: the module and the primary context are released
    assert [(r["kernels"], r["op"], r["layer"]) for r in rows] == [
        (emu.kernel_set, op, layer) for layer in bench_head.LAYER_NAMES for op in ("outlier_mask", "feature_distance")]
    for r in rows:
        assert r["requested_per_elem"] >= r["distinct_per_elem"] >= r["minimal_per_elem"] > 0, r
        # fd v2 unmasked: main + finalize; om v2 on planes in shared memory: plane + layer_stats
        assert r["launches"] >= 2
    masked = {r["layer"]: r["mask"] for r in rows if r["op"] == "feature_distance"}
    assert masked == {"mid": False, "up0": False, "up1": True, "up2": True, "up3": True}
    assert "not DRAM measurements" in bench_emulated_bytes.table(rows, 16)
    summary = bench_emulated_bytes.summary_table(rows).splitlines()
    assert len(summary) == 2 + 2 and all(line.count("|") == 5 for line in summary)  # om + fd none, one set
    # the streaming-path rows: a plane too large for the one-block path runs the radix passes
    streaming = bench_emulated_bytes.run_streaming((emu.kernel_set,), shapes=((1, 1, 256, 240),),
                                                   dtypes=("float32",), log=lambda line: None)
    gc.collect()
    (row,) = streaming
    assert row["layer"] == "streaming" and row["launches"] > 2, row
    assert row["requested_per_elem"] >= row["distinct_per_elem"] >= row["minimal_per_elem"] == 5, row
    assert "1x1x256x240" in bench_emulated_bytes.streaming_table(streaming)
    # the large-plane rows: unmasked feature distance, one row per norm
    large = bench_emulated_bytes.run_large_planes((emu.kernel_set,), shapes=((1, 2, 40, 36),), dtypes=("float32",),
                                                  norms=("batch", "shared"), log=lambda line: None)
    gc.collect()
    assert [(r["layer"], r["norm"], r["mask"]) for r in large] == [("large", "batch", False), ("large", "shared", False)]
    for r in large:
        assert r["requested_per_elem"] >= r["distinct_per_elem"] >= r["minimal_per_elem"] == 12, r
    # batch without the outlier mask's moments reads y once more for its statistics
    assert large[0]["read_per_elem"] >= large[1]["read_per_elem"] + 4, large
    assert "| v" in bench_emulated_bytes.large_plane_table(large) and "1x2x40x36" in \
        bench_emulated_bytes.large_plane_table(large)


# ---- the device's limits ------------------------------------------------------------------------------


class _Driver:
    """The stand-in's driver API through ctypes, with the caller's context pushed."""

    def __init__(self, lib: Path):
        self.cu = ctypes.CDLL(str(lib))
        assert self.cu.cuInit(0) == 0
        self.ctx = ctypes.c_void_p()
        assert self.cu.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), 0) == 0
        assert self.cu.cuCtxPushCurrent_v2(self.ctx) == 0

    def close(self) -> None:
        self.cu.cuCtxPopCurrent_v2(None)
        self.cu.cuDevicePrimaryCtxRelease_v2(0)

    def module(self, image: bytes) -> ctypes.c_void_p:
        mod = ctypes.c_void_p()
        assert self.cu.cuModuleLoadData(ctypes.byref(mod), image) == 0
        return mod

    def function(self, mod, name: str) -> ctypes.c_void_p:
        fn = ctypes.c_void_p()
        assert self.cu.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()) == 0, name
        return fn

    def attribute(self, fn, attr: int) -> int:
        v = ctypes.c_int()
        assert self.cu.cuFuncGetAttribute(ctypes.byref(v), attr, fn) == 0
        return v.value

    def launch(self, fn, grid, block, smem, args) -> int:
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        return self.cu.cuLaunchKernel(fn, *[ctypes.c_uint(v) for v in (*grid, *block, smem)], None, params, None)


@pytest.fixture
def driver(emu, monkeypatch):
    monkeypatch.delenv("FAKE_CUDA_CC", raising=False)
    drv = _Driver(emu.lib)
    yield drv
    drv.close()


CU_INVALID_VALUE, CU_LAUNCH_OUT_OF_RESOURCES = 1, 701
ATTR_MAX_THREADS, ATTR_SHARED, ATTR_MAX_DYNAMIC = 0, 1, 8


def _fill_args(out: np.ndarray, value: float) -> list:
    return [ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(out.size), ctypes.c_double(value)]


@pytest.mark.skipif(_image_for_emulation()[0] is None, reason="no shipped sm_90 cubin (built without nvcc)")
def test_launch_limits_of_the_device(emu, driver, monkeypatch):
    """What a GPU refuses, the stand-in refuses with the driver's code; what it accepts
    runs (lpl_v1_fd_fill writes its value). The frozen v1 kernels: their shared sizes and
    launch bounds never change."""
    mod = driver.module(_image_for_emulation()[0])
    fill, kept, main = (driver.function(mod, n)
                        for n in ("lpl_v1_fd_fill", "lpl_v1_fd_kept_count", "lpl_v1_fd_main_f32"))
    assert driver.attribute(fill, ATTR_SHARED) == 0 and driver.attribute(kept, ATTR_SHARED) == 32 * 8
    assert driver.attribute(main, ATTR_MAX_THREADS) == 256  # __launch_bounds__(LPL_FD_THREADS)
    out = np.zeros(1000)
    refused = {"block of 1025 threads": ((1, 1, 1), (1025, 1, 1), 0),
               "32 x 32 x 2 threads": ((1, 1, 1), (32, 32, 2), 0),
               "block z 65": ((1, 1, 1), (1, 1, 65), 0), "grid y 65536": ((1, 65536, 1), (32, 1, 1), 0),
               "grid z 65536": ((1, 1, 65536), (32, 1, 1), 0), "empty grid": ((0, 1, 1), (32, 1, 1), 0),
               "empty block": ((1, 1, 1), (0, 1, 1), 0), "48 KiB + 1 dynamic": ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1)}
    for what, (grid, block, smem) in refused.items():
        assert driver.launch(fill, grid, block, smem, _fill_args(out, 1.0)) == CU_INVALID_VALUE, what
    assert not out.any()  # nothing ran
    assert driver.launch(fill, (4, 1, 1), (256, 1, 1), 48 * 1024, _fill_args(out, 2.0)) == 0
    assert np.all(out == 2.0)
    assert driver.launch(fill, (1, 1, 1), (1024, 1, 1), 0, _fill_args(out, 3.0)) == 0 and np.all(out == 3.0)
    # static + dynamic: lpl_v1_fd_kept_count has 256 bytes of its own
    mask, kept_out = np.ones(64, np.uint8), np.zeros(1)
    kargs = [ctypes.c_void_p(mask.ctypes.data), ctypes.c_int64(64), ctypes.c_int64(1),
             ctypes.c_void_p(kept_out.ctypes.data)]
    assert driver.launch(kept, (1, 1, 1), (32, 1, 1), 48 * 1024 - 255, kargs) == CU_INVALID_VALUE
    assert driver.launch(kept, (1, 1, 1), (32, 1, 1), 48 * 1024 - 256, kargs) == 0 and kept_out[0] == 64
    # more threads than the kernel's launch bounds
    assert driver.launch(main, (1, 1, 1), (512, 1, 1), 0, [ctypes.c_int64(0)] * 15) == CU_LAUNCH_OUT_OF_RESOURCES
    # the opt-in: up to the device's maximum (227 KiB on sm_90, 99 KiB on sm_86) minus static
    assert driver.cu.cuFuncSetAttribute(fill, ATTR_MAX_DYNAMIC, 227 * 1024 + 1) == CU_INVALID_VALUE
    assert driver.cu.cuFuncSetAttribute(kept, ATTR_MAX_DYNAMIC, 227 * 1024 - 255) == CU_INVALID_VALUE
    assert driver.cu.cuFuncSetAttribute(fill, ATTR_MAX_DYNAMIC, 100 * 1024) == 0
    assert driver.attribute(fill, ATTR_MAX_DYNAMIC) == 100 * 1024
    assert driver.launch(fill, (1, 1, 1), (64, 1, 1), 100 * 1024, _fill_args(out, 4.0)) == 0 and np.all(out[:64] == 4)
    assert driver.launch(fill, (1, 1, 1), (64, 1, 1), 100 * 1024 + 1, _fill_args(out, 5.0)) == CU_INVALID_VALUE
    monkeypatch.setenv("FAKE_CUDA_CC", "86")
    assert driver.cu.cuFuncSetAttribute(fill, ATTR_MAX_DYNAMIC, 100 * 1024) == CU_INVALID_VALUE
    assert driver.cu.cuFuncSetAttribute(fill, ATTR_MAX_DYNAMIC, 99 * 1024) == 0
    assert driver.cu.cuModuleUnload(mod) == 0


@pytest.mark.skipif(not lpl_ext.build_info()["cuda_cubin_archs"], reason="built without nvcc: no cubins")
def test_static_shared_memory_is_read_from_every_cubin(emu, driver):
    """nvcc 13 counts the 1 KiB the driver reserves per block into .nv.shared.<kernel> from
    sm_90 on; the stand-in reports the kernel's own bytes on every architecture."""
    kdir = Path(lpl_ext.__file__).parent / "_kernels"
    for arch in lpl_ext.build_info()["cuda_cubin_archs"]:
        mod = driver.module((kdir / f"lpl_kernels.sm_{arch}.cubin").read_bytes())
        sizes = {n: driver.attribute(driver.function(mod, n), ATTR_SHARED)
                 for n in ("lpl_v1_fd_fill", "lpl_v1_fd_kept_count", "lpl_v1_om_moments_f32", "lpl_v1_om_radix_hist_f64")}
        # red[32] doubles; red[32] + redu[256] uint64; h[512] uint32 (the frozen 0.2 om kernels)
        assert sizes == {"lpl_v1_fd_fill": 0, "lpl_v1_fd_kept_count": 256, "lpl_v1_om_moments_f32": 256 + 2048,
                         "lpl_v1_om_radix_hist_f64": 2048}, (arch, sizes)
        assert driver.cu.cuModuleUnload(mod) == 0


# ---- warnings and deadlocks, from kernels written to provoke them -------------------------------------

PROVOKING_EDITS = {
    # a barrier reached from two source lines
    "cuda/v1_feature_distance_kernels.cuh": [(
        "    if (i < len) lpl_st(out, i, value);",
        "    if (threadIdx.x & 1)\n        __syncthreads();\n    else\n        __syncthreads();\n"
        "    if (i < len) lpl_st(out, i, value);")],
    # a shuffle after lanes exited; a block whose lane 0 waits at __syncthreads while the
    # rest of its warp waits at a shuffle for lane 0 (in the frozen 0.2 kernels)
    "cuda/v1_outlier_mask_kernels.cuh": [
        ("    if (plane >= planes) return;\n    double count = 0.0, sum = 0.0;",
         "    if (plane >= planes) return;\n    (void)__shfl_down_sync(0xffffffffu, 1.0, 1);\n"
         "    double count = 0.0, sum = 0.0;"),
        ("    if (t >= planes * 2) return;",
         "    if (threadIdx.x == 0)\n        __syncthreads();\n    else\n"
         "        (void)__shfl_down_sync(0xffffffffu, 1.0, 1);\n    if (t >= planes * 2) return;")],
}


def _edited_sources(dest: Path, edits: Dict[str, list]) -> Path:
    """A copy of csrc/'s kernel sources with textual edits, each of which must apply once."""
    for rel in KERNEL_FILES:
        text = (ROOT / "csrc" / rel).read_text()
        for old, new in edits.get(rel, []):
            assert text.count(old) == 1, (rel, old)
            text = text.replace(old, new)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    return dest


class _OmWs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("part_d", "part_u", "plane_d", "plane_u", "hist", "tmp")]


@pytest.mark.skipif(_image_for_emulation()[0] is None, reason="no shipped sm_90 cubin (built without nvcc)")
def test_divergent_barriers_are_reported(tmp_path_factory, monkeypatch):
    src = _edited_sources(tmp_path_factory.mktemp("provoking_csrc"), PROVOKING_EDITS)
    lib = build_fake_libcuda(build_dir(tmp_path_factory.getbasetemp()), SANITIZE, src)
    monkeypatch.setenv("FAKE_CUDA_DEADLOCK_MS", "600")
    drv = _Driver(lib)
    drv.cu.fake_warning.restype = ctypes.c_char_p
    try:
        drv.cu.fake_clear_warnings()
        mod = drv.module(_image_for_emulation()[0])
        out = np.zeros(64)
        assert drv.launch(drv.function(mod, "lpl_v1_fd_fill"), (1, 1, 1), (64, 1, 1), 0, _fill_args(out, 1.0)) == 0
        assert np.all(out == 1.0)
        warnings = [drv.cu.fake_warning(i).decode() for i in range(drv.cu.fake_warning_count())]
        assert len(warnings) == 1 and re.search(r"lpl_v1_fd_fill: __syncthreads reached from two source lines, "
                                                r"\S+feature_distance_kernels.cuh:\d+ and \S+:\d+", warnings[0])
        drv.cu.fake_clear_warnings()
        part = np.zeros(8)
        keys = np.array([2 ** 64 - 1, 0], np.uint64)
        plane = np.zeros(16)
        plane_u = np.zeros(4, np.uint64)
        hist = np.zeros(512, np.uint32)
        ws = _OmWs(part.ctypes.data, keys.ctypes.data, plane.ctypes.data, plane_u.ctypes.data, hist.ctypes.data, None)
        setup = [ctypes.c_int64(1), ctypes.c_int64(1), ctypes.c_double(0.02), ctypes.c_int(0), ws]
        assert drv.launch(drv.function(mod, "lpl_v1_om_setup"), (1, 1, 1), (128, 1, 1), 0, setup) == 0
        warnings = [drv.cu.fake_warning(i).decode() for i in range(drv.cu.fake_warning_count())]
        assert len(warnings) == 1 and "after lanes exited" in warnings[0]
        assert warnings[0].startswith("lpl_v1_om_setup: a warp shuffle or __syncwarp at")
        select = [ctypes.c_int64(0), ctypes.c_int(0), ws]
        assert drv.launch(drv.function(mod, "lpl_v1_om_radix_select"), (1, 1, 1), (32, 1, 1), 0, select) == 719
    finally:
        drv.close()
