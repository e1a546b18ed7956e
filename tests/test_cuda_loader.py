"""The CUDA path as far as a machine without a GPU reaches (docs/cuda.md): the kernel
sources and cubins the build ships, NVRTC discovery in torch's CUDA wheel layouts and
compilation of every kernel, the on-disk cache, and the whole host side (driver API,
image choice, argument checks, context and stream handling, launch sequences) against
tests/fake_cuda/fake_libcuda.c, a stand-in driver that records each launch and runs it on
the emulated device (tests/emu/; the kernels' results are checked in
tests/test_cuda_emulated.py)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import lpl_ext
from lpl_ext import _C, _cuda
from fake_cuda.build import build as build_fake_libcuda, build_dir
from test_fuzz import DL_CODES, make_capsule  # the suite's DLPack capsule builder
from lpl_ext import _kernel_sources as ks

ROOT = Path(__file__).resolve().parent.parent
KERNEL_NAMES = _C.cuda_kernel_names()


def _nvrtc_test_libs() -> dict:
    """{CUDA major: libnvrtc path} from $LPL_EXT_TEST_NVRTC_SITES (os.pathsep-separated
    site folders) or .ci-nvrtc/*, where CI installs the NVRTC wheels of CUDA 12 and 13."""
    sites = [s for s in os.environ.get("LPL_EXT_TEST_NVRTC_SITES", "").split(os.pathsep) if s]
    sites += sorted(str(p) for p in (ROOT / ".ci-nvrtc").glob("*"))
    found = {}
    for site in sites:
        for path in _cuda.nvrtc_candidates(search_path=[site], cuda_major=None, env={}):
            if site in path:
                found.setdefault(_cuda._soname_major(os.path.basename(path)), path)
    return found


NVRTC_LIBS = _nvrtc_test_libs()
NVRTC_SKIP = ("no NVRTC wheel installed for the tests: pip install --target .ci-nvrtc/cu12 nvidia-cuda-nvrtc-cu12 "
              "and --target .ci-nvrtc/cu13 nvidia-cuda-nvrtc (as .ci/run does)")


def _image_kernels(image: bytes) -> set:
    return {m.decode() for m in re.findall(rb"lpl_(?:v1_)?(?:fd|om|scale)_[a-z0-9_]+", image)}


# ---- what the build ships ----------------------------------------------------------


def test_build_ships_kernel_sources_and_manifest():
    kdir = Path(lpl_ext.__file__).parent / "_kernels"
    manifest = json.loads((kdir / ks.MANIFEST).read_text())
    shipped = ks.read_sources(kdir)
    assert manifest["source_sha256"] == ks.source_hash(shipped)
    if (ROOT / "csrc").is_dir() and Path(lpl_ext.__file__).parent == ROOT / "lpl_ext":
        assert shipped == ks.read_sources(ROOT / "csrc", ks.REPO_LAYOUT), "in-place build older than csrc/: rebuild"
    info = lpl_ext.build_info()
    assert info["cuda_launcher"] == "driver-api"
    assert info["cuda_kernel_sources"] is True
    assert info["cuda_cubin_archs"] == sorted(manifest["archs"], key=int)


@pytest.mark.skipif(lpl_ext.build_info()["cuda_cubin_toolkit"] is None,
                    reason="this build was made without nvcc: it ships no cubins (NVRTC covers CUDA); "
                           ".ci/run checks that a build with nvcc ships them")
def test_cubins_shipped_for_every_arch_with_every_kernel():
    kdir = Path(lpl_ext.__file__).parent / "_kernels"
    manifest = json.loads((kdir / ks.MANIFEST).read_text())
    assert {"80", "86", "89", "90"} <= set(manifest["archs"])
    for arch, name in manifest["archs"].items():
        image = (kdir / name).read_bytes()
        assert image[:4] == b"\x7fELF", name
        assert set(KERNEL_NAMES) <= _image_kernels(image), (arch, set(KERNEL_NAMES) - _image_kernels(image))


def test_shipped_cubin_choice_follows_binary_compatibility():
    manifest = {"archs": {a: ks.cubin_name(a) for a in ("80", "86", "89", "90", "100", "120")}}
    assert _cuda.shipped_cubin_candidates(8, 6, manifest) == ["86", "80"]
    assert _cuda.shipped_cubin_candidates(8, 7, manifest) == ["86", "80"]
    assert _cuda.shipped_cubin_candidates(9, 0, manifest) == ["90"]
    assert _cuda.shipped_cubin_candidates(10, 3, manifest) == ["100"]
    assert _cuda.shipped_cubin_candidates(11, 0, manifest) == []  # -> NVRTC
    assert _cuda.shipped_cubin_candidates(7, 5, manifest) == []


# ---- NVRTC discovery and compilation -----------------------------------------------


def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_nvrtc_candidates_in_torch_wheel_layouts(tmp_path):
    site = tmp_path / "site-packages"
    cu13 = _touch(site / "nvidia" / "cu13" / "lib" / "libnvrtc.so.13")
    _touch(site / "nvidia" / "cu13" / "lib" / "libnvrtc-builtins.so.13.0")
    cu12 = _touch(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12")
    _touch(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.alt.so.12")
    bundled = _touch(site / "torch" / "lib" / "libnvrtc-672ee683.so.11.2")
    for major, first in ((12, cu12), (13, cu13), (11, bundled)):
        cands = _cuda.nvrtc_candidates(search_path=[str(site)], cuda_major=major, env={})
        ours = [c for c in cands if c.startswith(str(site))]
        assert ours[0] == first, (major, ours)
        assert set(ours) == {cu12, cu13, bundled}  # builtins and .alt variants are not NVRTC
    explicit = str(tmp_path / "mine" / "libnvrtc.so")
    assert _cuda.nvrtc_candidates(search_path=[str(site)], cuda_major=12, env={"LPL_EXT_NVRTC": explicit})[0] == explicit


@pytest.mark.skipif(not NVRTC_LIBS, reason=NVRTC_SKIP)
def test_nvrtc_found_in_simulated_torch_install(tmp_path):
    major, real = sorted(NVRTC_LIBS.items())[0]
    sub = "cu13" if major >= 13 else "cuda_nvrtc"
    lib_dir = tmp_path / "site-packages" / "nvidia" / sub / "lib"
    lib_dir.mkdir(parents=True)
    for f in Path(real).parent.iterdir():  # the library and its builtins, as the wheel lays them out
        (lib_dir / f.name).symlink_to(f)
    cands = _cuda.nvrtc_candidates(search_path=[str(tmp_path / "site-packages")], cuda_major=major, env={})
    nv = _cuda.load_nvrtc([c for c in cands if str(tmp_path) in c])
    assert nv.version[0] == major and str(tmp_path) in nv.path


class _Compiled:
    """compile_cached's NVRTC for images already compiled by ``nv``: the cache stores them
    where load_kernels looks (the library's own cache path and atomic write)."""

    def __init__(self, nv, images: dict):
        self.nv, self.images, self.version, self.path = nv, images, nv.version, nv.path

    def supported_archs(self):
        return self.nv.supported_archs()

    def compile(self, sources, target):
        return self.images[target]


@pytest.fixture(scope="module")
def nvrtc_compiles():
    """{(major, target): image} of every kernel, compiled for real (whatever the cache holds)
    by each NVRTC found, for sm_90 and compute_90: the four compiles run two at a time
    (NVRTC releases the GIL; distinct programs may compile concurrently), about 40 s on 2
    cores instead of 80 s one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    sources, _ = _cuda.kernel_sources()
    nvs = {major: _cuda.load_nvrtc([lib]) for major, lib in NVRTC_LIBS.items()}
    jobs = [(major, target) for target in ("sm_90", "compute_90") for major in sorted(nvs)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        images = list(pool.map(lambda job: nvs[job[0]].compile(sources, job[1]), jobs))
    return {"nvrtc": nvs, "sources": sources, "images": dict(zip(jobs, images))}


@pytest.mark.parametrize("major", [12, 13])
def test_nvrtc_compiles_every_kernel_for_sm90(major, nvrtc_compiles, nvrtc_cache, monkeypatch):
    if major not in NVRTC_LIBS:
        pytest.skip(NVRTC_SKIP)
    nv = nvrtc_compiles["nvrtc"][major]
    sources = nvrtc_compiles["sources"]
    cubin = nvrtc_compiles["images"][(major, "sm_90")]
    assert cubin[:4] == b"\x7fELF"
    assert set(KERNEL_NAMES) <= _image_kernels(cubin)
    ptx = nvrtc_compiles["images"][(major, "compute_90")].decode(errors="replace")
    assert set(KERNEL_NAMES) <= _image_kernels(ptx.encode())
    # -fmad=false: no contraction anywhere, as the CPU build (-ffp-contract=off)
    assert re.search(r"\bfma\.", ptx) is None
    # the session's NVRTC cache gets this cubin: the sm_90 loads of this NVRTC below and in
    # tests/test_nvrtc_retry.py find it instead of compiling the same sources again
    monkeypatch.setenv("LPL_EXT_CACHE_DIR", str(nvrtc_cache))
    image, path = _cuda.compile_cached(90, _Compiled(nv, {"sm_90": cubin}), sources)
    assert path.is_file() and path.name.startswith(f"lpl_kernels-sm_90-nvrtc{nv.version[0]}.")
    assert image == path.read_bytes()


def test_nvrtc_target_falls_back_to_ptx_for_unknown_archs():
    assert _cuda.nvrtc_target(90, [80, 86, 89, 90]) == "sm_90"
    assert _cuda.nvrtc_target(120, [80, 86, 89, 90, 100]) == "compute_100"
    with pytest.raises(RuntimeError, match="sm_75"):
        _cuda.nvrtc_target(70, [75, 80])


def test_cache_key_changes_with_source_arch_and_version():
    base = _cuda.cache_key("a" * 64, "sm_90", (12, 9))
    assert base == _cuda.cache_key("a" * 64, "sm_90", (12, 9))
    assert len({base, _cuda.cache_key("b" * 64, "sm_90", (12, 9)), _cuda.cache_key("a" * 64, "sm_80", (12, 9)),
                _cuda.cache_key("a" * 64, "sm_90", (13, 0))}) == 4
    sources, _ = _cuda.kernel_sources()
    edited = dict(sources)
    edited["lpl_math.h"] = sources["lpl_math.h"] + b"\n/* edited */\n"
    assert ks.source_hash(edited) != ks.source_hash(sources)


class _CountingNvrtc:
    """An NVRTC stand-in that counts compiles (the cache must make the second free)."""

    version = (12, 9)
    path = "fake"

    def __init__(self):
        self.compiles = 0

    def supported_archs(self):
        return [80, 90]

    def compile(self, sources, target):
        self.compiles += 1
        return b"\x7fELF" + ks.source_hash(sources).encode() + target.encode()


def test_compile_cache_hits_and_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("LPL_EXT_CACHE_DIR", str(tmp_path))
    nv = _CountingNvrtc()
    sources, _ = _cuda.kernel_sources()
    image, path = _cuda.compile_cached(90, nv, sources)
    assert nv.compiles == 1 and path.parent == tmp_path / "kernels" and path.read_bytes() == image
    assert _cuda.compile_cached(90, nv, sources) == (image, path) and nv.compiles == 1
    edited = dict(sources)
    edited["lpl_math.h"] += b"\n"
    image2, path2 = _cuda.compile_cached(90, nv, edited)
    assert nv.compiles == 2 and path2 != path and image2 != image
    _cuda.compile_cached(80, nv, sources)
    assert nv.compiles == 3
    assert not list((tmp_path / "kernels").glob(".tmp-*"))  # written atomically


def test_missing_nvrtc_names_the_remedy():
    with pytest.raises(RuntimeError) as exc:
        _cuda.load_nvrtc([])
    msg = str(exc.value)
    assert "NVRTC is not available" in msg and "nvidia-cuda-nvrtc-cu12" in msg and "LPL_EXT_NVRTC" in msg
    with pytest.raises(RuntimeError, match="/nonexistent/libnvrtc.so.12"):
        _cuda.load_nvrtc(["/nonexistent/libnvrtc.so.12"])


def test_missing_driver_names_the_library_and_remedy():
    with pytest.raises(RuntimeError) as exc:
        _C.cuda_driver_open("/nonexistent/libcuda.so.1")
    msg = str(exc.value)
    assert "/nonexistent/libcuda.so.1" in msg and "NVIDIA driver" in msg and "CPU tensors keep working" in msg


def test_unknown_kernel_mode(monkeypatch):
    monkeypatch.setenv("LPL_EXT_KERNELS", "fastest")
    with pytest.raises(ValueError, match="LPL_EXT_KERNELS: unknown option 'fastest'"):
        _cuda.kernel_mode()


# ---- the host path against a stand-in driver ---------------------------------------


class FakeCudaArray:
    """A host numpy array presented through DLPack as if it lived on cuda:<device> (the
    stand-in driver's "device memory" is host memory). bfloat16 data is stored as uint16."""

    def __init__(self, array: np.ndarray, device: int = 0, bfloat16: bool = False):
        self.array = np.ascontiguousarray(array)
        self.device = device
        self.dtype = "bfloat16" if bfloat16 else self.array.dtype.name
        self._keep = [self.array]

    def __dlpack__(self, stream=None):
        a = self.array
        return make_capsule(self._keep, a.ctypes.data, list(a.shape), None, *DL_CODES[self.dtype],
                            device=2, device_id=self.device)  # kDLCUDA


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory):
    # the stand-in with the emulated device, built once per session (cached by content)
    return build_fake_libcuda(build_dir(tmp_path_factory.getbasetemp()), os.environ.get("LPL_EMU_SANITIZE") or None)


@pytest.fixture
def fake_cuda(fake_libcuda, nvrtc_cache, tmp_path, monkeypatch):
    """The stand-in driver for lpl_ext; yields a reader of its launch log. NVRTC images go
    to the session's cache (tests/conftest.py, nvrtc_cache)."""
    log = tmp_path / "launches.log"
    monkeypatch.setenv("LPL_EXT_LIBCUDA", str(fake_libcuda))
    monkeypatch.setenv("FAKE_CUDA_LOG", str(log))
    monkeypatch.setenv("LPL_EXT_CACHE_DIR", str(nvrtc_cache))
    for var in ("FAKE_CUDA_CC", "FAKE_CUDA_DEVICES", "FAKE_CUDA_REJECT_CUBIN", "FAKE_CUDA_INIT_ERROR",
                "LPL_EXT_KERNELS", "LPL_EXT_NVRTC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_cuda, "_state", {"driver": None, "kernels": {}, "nvrtc": None})
    lib = ctypes.CDLL(str(fake_libcuda))
    lib.fake_reset()

    class Fake:
        hooks = lib

        @staticmethod
        def lines(kind="launch"):
            if not log.exists():
                return []
            return [line.split() for line in log.read_text().splitlines() if line.startswith(kind)]

        @staticmethod
        def kernels():
            return [fields[1] for fields in Fake.lines()]

        @staticmethod
        def clear():
            log.unlink(missing_ok=True)

    yield Fake
    _cuda._state["kernels"].clear()
    gc.collect()


def _has_cubin(arch: str) -> bool:
    return arch in lpl_ext.build_info()["cuda_cubin_archs"]


def _field(fields, key):
    return next(f.split("=", 1)[1] for f in fields if f.startswith(key + "="))


def _fd_args(n=2, c=3, h=4, w=5, dtype=np.float32, masked=False, device=0, bf16=False):
    x = FakeCudaArray(np.ones((n, c, h, w), dtype), device, bf16)
    y = FakeCudaArray(np.ones((n, c, h, w), dtype), device, bf16)
    mask = FakeCudaArray(np.ones((n, c, h, w), np.bool_), device) if masked else None
    loss = FakeCudaArray(np.zeros(n, np.float64), device)
    grad = FakeCudaArray(np.zeros((n, c, h, w), dtype), device, bf16)
    ws = FakeCudaArray(np.full(_C.feature_distance_workspace(n, c), np.nan), device)
    return x, y, mask, loss, grad, ws


@pytest.mark.skipif(not _has_cubin("90"), reason="no shipped sm_90 cubin (built without nvcc)")
def test_feature_distance_launches_on_the_callers_stream(fake_cuda):
    kernels, origin = _cuda.load_kernels(0)
    assert origin.startswith("cubin sm_90")
    x, y, mask, loss, grad, ws = _fd_args()
    _C.feature_distance(x, y, None, loss, grad, "shared", "mse", 1.0, stream=0xABC, workspace=ws, kernels=kernels)
    assert fake_cuda.kernels() == ["lpl_fd_main_f32", "lpl_fd_finalize"]
    for fields in fake_cuda.lines():
        assert _field(fields, "stream") == str(0xABC) and _field(fields, "depth") == "1"
    main = fake_cuda.lines()[0]
    # 20 pixels: a tile of 32 lanes; 4 per-pixel floats and the staged y (3 channels)
    assert int(_field(main, "smem")) == 4 * 32 * 4 + 3 * 32 * 4
    # no scratch needs zeroing (every partial is written); x == y gives a loss of 0
    assert fake_cuda.lines("memset") == []
    assert np.all(loss.array == 0)
    assert fake_cuda.hooks.fake_ctx_depth() == 0  # the caller's context is restored


@pytest.mark.skipif(not _has_cubin("90"), reason="no shipped sm_90 cubin (built without nvcc)")
def test_batch_norm_and_mask_sequence_bf16(fake_cuda):
    kernels, _ = _cuda.load_kernels(0)
    x, y, mask, loss, grad, ws = _fd_args(dtype=np.uint16, masked=True, bf16=True)
    _C.feature_distance(x, y, mask, loss, grad, "batch", "l1", 0.5, stream=7, workspace=ws, kernels=kernels)
    assert fake_cuda.kernels() == ["lpl_fd_stats_bf16", "lpl_fd_setup", "lpl_fd_main_bf16", "lpl_fd_finalize"]


@pytest.mark.skipif(not _has_cubin("90"), reason="no shipped sm_90 cubin (built without nvcc)")
@pytest.mark.parametrize("dtype,suffix,passes", [(np.float16, "f16", 2), (np.float32, "f32", 4), (np.float64, "f64", 8)])
def test_outlier_mask_sequence(fake_cuda, dtype, suffix, passes):
    """v2: a plane that fits in shared memory is one block's work (read once, mask written
    once), then the layer statistics; the 0.2 kernels (v1): moments, one histogram and
    select per 8-bit digit, thresholds, four separable filters, statistics."""
    n, c, h, w = 1, 2, 9, 7
    for kernel_set in ("v2", "v1"):
        kernels, _ = _cuda.load_kernels(0, kernel_set)
        y = FakeCudaArray(np.ones((n, c, h, w), dtype))
        keep = FakeCudaArray(np.zeros((n, c, h, w), np.bool_))
        stats = FakeCudaArray(np.zeros(3, np.float64))
        ws = FakeCudaArray(np.zeros(_C.outlier_mask_workspace_bytes(n, c, h, w), np.uint8))
        fake_cuda.clear()
        _C.outlier_mask(y, keep, stats, 0.02, 2.0, 3, 5, stream=11, workspace=ws, kernels=kernels)
        if kernel_set == "v2":
            assert fake_cuda.kernels() == [f"lpl_om_plane_{suffix}", "lpl_om_layer_stats"]
        else:
            radix = [f"lpl_v1_om_radix_hist_{suffix}", "lpl_v1_om_radix_select"] * passes
            assert fake_cuda.kernels() == [
                f"lpl_v1_om_moments_{suffix}", "lpl_v1_om_setup", f"lpl_v1_om_variance_{suffix}", *radix,
                "lpl_v1_om_thresholds", f"lpl_v1_om_keep_rowor_{suffix}", "lpl_v1_om_col_or", "lpl_v1_om_row_and",
                f"lpl_v1_om_final_{suffix}", "lpl_v1_om_plane_stats", "lpl_v1_om_layer_stats"]
        assert {_field(f, "stream") for f in fake_cuda.lines()} == {"11"}
        assert fake_cuda.hooks.fake_ctx_depth() == 0
        del kernels


@pytest.mark.skipif(not _has_cubin("90"), reason="no shipped sm_90 cubin (built without nvcc)")
def test_cuda_argument_errors(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_DEVICES", "2")
    kernels, _ = _cuda.load_kernels(0)
    x, y, mask, loss, grad, ws = _fd_args()
    with pytest.raises(ValueError, match="stream: required for CUDA tensors"):
        _C.feature_distance(x, y, None, loss, grad, "shared", "mse", 1.0, workspace=ws, kernels=kernels)
    with pytest.raises(TypeError, match="kernels: required for CUDA tensors"):
        _C.feature_distance(x, y, None, loss, grad, "shared", "mse", 1.0, stream=0, workspace=ws)
    with pytest.raises(TypeError, match="kernels: expected the capsule"):
        _C.feature_distance(x, y, None, loss, grad, "shared", "mse", 1.0, stream=0, workspace=ws, kernels=object())
    on1 = _fd_args(device=1)
    with pytest.raises(ValueError, match="kernels: loaded for cuda:0, but the tensors are on cuda:1"):
        _C.feature_distance(*on1[:2], None, *on1[3:5], "shared", "mse", 1.0, stream=0, workspace=on1[5],
                            kernels=kernels)
    with pytest.raises(ValueError, match="stream: not a valid stream handle"):
        _C.feature_distance(x, y, None, loss, grad, "shared", "mse", 1.0, stream=-1, workspace=ws, kernels=kernels)
    with pytest.raises(ValueError, match="device: CUDA device 5 does not exist"):
        _cuda.load_kernels(5)
    assert fake_cuda.kernels() == []  # nothing was launched by a refused call
    # CPU tensors keep working in the same process
    import torch

    cpu = lpl_ext.feature_distance(torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), norm="none")
    assert float(cpu[0]) == pytest.approx(1.0)


@pytest.mark.skipif(not _has_cubin("90"), reason="no shipped sm_90 cubin (built without nvcc)")
def test_kernels_are_released_with_their_capsule(fake_cuda):
    kernels, _ = _cuda.load_kernels(0)
    assert fake_cuda.hooks.fake_retained(0) == 1
    del kernels
    gc.collect()
    assert fake_cuda.hooks.fake_retained(0) == 0


def test_driver_failure_is_a_clear_error(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_INIT_ERROR", "1")
    with pytest.raises(RuntimeError, match="cuInit: CUDA_ERROR_NO_DEVICE.*nvidia-smi"):
        _cuda.load_kernels(0)


def test_no_image_path_lists_every_reason(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_CC", "75")  # a GPU no shipped cubin covers (Turing)
    monkeypatch.setattr(_cuda, "nvrtc_candidates", lambda *a, **k: ["/nonexistent/libnvrtc.so.12"])
    with pytest.raises(RuntimeError) as exc:
        _cuda.load_kernels(0)
    msg = str(exc.value)
    assert "no CUDA kernels for cuda:0 (compute capability 7.5" in msg
    assert "shipped cubins: none for sm_75" in msg
    assert "NVRTC is not available" in msg and "nvidia-cuda-nvrtc-cu12" in msg


@pytest.mark.skipif(not _has_cubin("90"), reason="no shipped sm_90 cubin (built without nvcc)")
def test_driver_refusing_the_cubin(fake_cuda, monkeypatch):
    # a driver older than the toolkit that built the shipped cubin refuses it
    monkeypatch.setenv("FAKE_CUDA_REJECT_CUBIN", "1")
    monkeypatch.setenv("LPL_EXT_KERNELS", "cubin")
    with pytest.raises(RuntimeError, match="shipped cubin sm_90: .*CUDA_ERROR_UNSUPPORTED_PTX_VERSION"):
        _cuda.load_kernels(0)
    if not NVRTC_LIBS:
        pytest.skip(NVRTC_SKIP)
    fake_cuda.hooks.fake_reset()
    monkeypatch.setenv("LPL_EXT_KERNELS", "auto")
    monkeypatch.setenv("LPL_EXT_NVRTC", sorted(NVRTC_LIBS.items())[0][1])
    kernels, origin = _cuda.load_kernels(0)  # the shipped cubin is refused once, NVRTC's is loaded
    assert origin.startswith("NVRTC")
    assert [f[3] for f in fake_cuda.lines("load")] == ["elf=1"]  # one image loaded, after the refusal


@pytest.mark.skipif(not NVRTC_LIBS, reason=NVRTC_SKIP)
def test_nvrtc_path_end_to_end(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_CUDA_CC", "75")  # no shipped cubin: NVRTC compiles for it
    monkeypatch.setenv("LPL_EXT_NVRTC", sorted(NVRTC_LIBS.items())[-1][1])
    kernels, origin = _cuda.load_kernels(0)
    assert origin.startswith("NVRTC")
    assert list((Path(os.environ["LPL_EXT_CACHE_DIR"]) / "kernels").glob("lpl_kernels-sm_75-*"))
    x, y, mask, loss, grad, ws = _fd_args(dtype=np.float64)
    _C.feature_distance(x, y, None, loss, grad, "default", "mse", 1.0, stream=3, workspace=ws, kernels=kernels)
    assert fake_cuda.kernels() == ["lpl_fd_main_f64", "lpl_fd_finalize"]
