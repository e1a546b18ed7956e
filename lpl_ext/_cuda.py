"""CUDA kernels for the GPU at hand (docs/cuda.md).

The C module launches kernels through the CUDA driver API (libcuda, opened at run time)
on the caller's stream. The kernel image for a device comes from, in order:

1. a cubin shipped with the package (built by nvcc when the package was built), if
   there is one for the device's architecture and the driver can load it;
2. NVRTC, compiling the same sources (also shipped) for the device at first use. The
   library is looked up in the user's environment (torch's CUDA wheels bring it), and
   the result is cached on disk, keyed by source hash, architecture and NVRTC version.

The environment switches (``LPL_EXT_KERNELS``, ``LPL_EXT_KERNEL_SET``, ``LPL_EXT_NVRTC``,
``LPL_EXT_LIBCUDA``, ``LPL_EXT_CACHE_DIR``) are documented once, in docs/cuda.md, "Switches".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import _C
from . import _kernel_sources as ks

PACKAGE_DIR = Path(__file__).resolve().parent
KERNEL_DIR = PACKAGE_DIR / "_kernels"
REPO_CSRC = PACKAGE_DIR.parent / "csrc"
KERNEL_MODES = ("auto", "cubin", "nvrtc")
#: LPL_EXT_KERNEL_SET: which launch sequences run, by name -> the C module's code: the
#: current kernels, or the 0.2 ones kept until a GPU run has compared the two.
KERNEL_SETS = {"v2": 2, "v1": 1}

_lock = threading.Lock()
_state: Dict[str, Any] = {"driver": None, "kernels": {}, "nvrtc": None}

NVRTC_REMEDY = (
    "install NVRTC for your torch's CUDA major version (pip install nvidia-cuda-nvrtc-cu12 for "
    "CUDA 12 builds of torch, pip install nvidia-cuda-nvrtc for CUDA 13), or point "
    "LPL_EXT_NVRTC at a libnvrtc.so, or reinstall lpl_ext on a machine with nvcc so that it "
    "ships a cubin for this GPU (LPL_EXT_CUDA_ARCHS)"
)


# ---- kernel sources and shipped cubins ---------------------------------------------


def kernel_sources() -> Tuple[Dict[str, bytes], Path]:
    """({name: bytes}, folder) of the kernel sources: the checkout's csrc/ when lpl_ext
    runs from one (the sources being edited are the truth), else the installed copy."""
    if (REPO_CSRC / ks.REPO_LAYOUT[ks.MAIN]).is_file():
        return ks.read_sources(REPO_CSRC, ks.REPO_LAYOUT), REPO_CSRC
    if (KERNEL_DIR / ks.MAIN).is_file():
        return ks.read_sources(KERNEL_DIR), KERNEL_DIR
    raise RuntimeError(
        f"lpl_ext: the CUDA kernel sources are not installed ({KERNEL_DIR} has no {ks.MAIN}); "
        "this build was made with LPL_EXT_CUDA=0. Reinstall lpl_ext without LPL_EXT_CUDA=0 to use CUDA tensors"
    )


def shipped_manifest() -> Dict[str, Any]:
    """The build's record of shipped cubins: {"source_sha256", "toolkit", "archs": {arch:
    file}}; empty archs when the package was built without nvcc."""
    path = KERNEL_DIR / ks.MANIFEST
    if not path.is_file():
        return {"source_sha256": None, "toolkit": None, "archs": {}}
    return json.loads(path.read_text())


def shipped_cubin_candidates(major: int, minor: int, manifest: Dict[str, Any]) -> List[str]:
    """Shipped architectures a device of compute capability major.minor can run, best
    first: a cubin for sm_XY runs on sm_XZ with Z >= Y (same major)."""
    archs = []
    for arch in manifest.get("archs", {}):
        digits = arch.rstrip("af")
        if not digits.isdigit() or arch != digits:  # sm_90a-style cubins run on that exact chip only
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if a_major == major and a_minor <= minor:
            archs.append((a_minor, arch))
    return [arch for _, arch in sorted(archs, reverse=True)]


# ---- NVRTC -------------------------------------------------------------------------


def _torch_cuda_major() -> Optional[int]:
    torch = sys.modules.get("torch")
    version = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def _loaded_nvrtc() -> List[str]:
    """libnvrtc already mapped into this process (torch may have loaded its own)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    found = []
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        name = os.path.basename(path)
        if name.startswith("libnvrtc") and "builtins" not in name and ".so" in name and path not in found:
            found.append(path)
    return found


def nvrtc_candidates(search_path: Optional[Sequence[str]] = None, cuda_major: Optional[int] = None,
                     env: Optional[Dict[str, str]] = None) -> List[str]:
    """Where to look for libnvrtc, in order: $LPL_EXT_NVRTC; a copy already loaded in
    the process; torch's CUDA wheels in ``search_path`` (default sys.path:
    nvidia/cu13/lib, nvidia/cuda_nvrtc/lib, torch/lib), the major of torch's CUDA
    first; a conda environment's lib/; $CUDA_HOME and /usr/local/cuda; the system's
    loader path."""
    env = os.environ if env is None else env
    search_path = list(sys.path) if search_path is None else list(search_path)
    cuda_major = _torch_cuda_major() if cuda_major is None else cuda_major
    out: List[str] = []

    def add(paths: Sequence[str]) -> None:
        for p in paths:
            if p and p not in out:
                out.append(p)

    if env.get("LPL_EXT_NVRTC"):
        add([env["LPL_EXT_NVRTC"]])
    add(_loaded_nvrtc())
    wheel_hits: List[Tuple[int, str]] = []
    for base in search_path:
        if not base or not os.path.isdir(base):
            continue
        patterns = [
            os.path.join(base, "nvidia", "cu*", "lib", "libnvrtc.so*"),
            os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"),
            os.path.join(base, "torch", "lib", "libnvrtc*.so*"),
        ]
        for pattern in patterns:
            for hit in sorted(glob.glob(pattern)):
                name = os.path.basename(hit)
                if "builtins" in name or ".alt." in name:
                    continue
                major = _soname_major(name)
                wheel_hits.append((0 if cuda_major is not None and major == cuda_major else 1, hit))
    add([p for _, p in sorted(wheel_hits, key=lambda t: t[0])])
    # a conda environment keeps CUDA's libraries in <prefix>/lib
    add(sorted(p for p in glob.glob(os.path.join(sys.prefix, "lib", "libnvrtc.so*")) if "builtins" not in p)[:1])
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            add(sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))[:1])
            add(sorted(glob.glob(os.path.join(home, "lib", "libnvrtc.so*")))[:1])
    found = ctypes.util.find_library("nvrtc")
    if found:
        add([found])
    return out


def _soname_major(name: str) -> Optional[int]:
    # libnvrtc.so.12 / libnvrtc.so.13.0 / libnvrtc-672ee683.so.11.2
    tail = name.split(".so.", 1)
    if len(tail) == 2 and tail[1].split(".")[0].isdigit():
        return int(tail[1].split(".")[0])
    return None


class Nvrtc:
    """The NVRTC library through ctypes: version, supported architectures, compile."""

    def __init__(self, path: str) -> None:
        self.path = path
        # NVRTC dlopens its builtins library by soname at compile time; load the one next
        # to it first, so that the lookup never depends on how NVRTC was found
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
            try:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
        self.lib = ctypes.CDLL(path)
        lib = self.lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, rc: int, what: str, log: str = "") -> None:
        if rc != 0:
            msg = self.lib.nvrtcGetErrorString(rc).decode(errors="replace")
            raise RuntimeError(f"NVRTC ({self.path}): {what} failed: {msg}" + (f"\n{log}" if log else ""))

    def supported_archs(self) -> List[int]:
        """Architectures this NVRTC compiles for (e.g. [75, 80, ..., 120])."""
        if not hasattr(self.lib, "nvrtcGetSupportedArchs"):
            return []
        n = ctypes.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return list(archs)

    def compile(self, sources: Dict[str, bytes], target: str) -> bytes:
        """Compile the kernel sources for ``target`` ("sm_90": a cubin, "compute_90":
        PTX, NUL-terminated as the driver wants it)."""
        lib = self.lib
        headers = [n for n in sources if n != ks.MAIN]
        prog = ctypes.c_void_p()
        hdr_src = (ctypes.c_char_p * len(headers))(*[sources[n] for n in headers])
        hdr_names = (ctypes.c_char_p * len(headers))(*[n.encode() for n in headers])
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), sources[ks.MAIN], ks.MAIN.encode(), len(headers),
                                           hdr_src, hdr_names), "nvrtcCreateProgram")
        try:
            opts = [f"--gpu-architecture={target}".encode(), *[o.encode() for o in ks.COMMON_OPTIONS]]
            copts = (ctypes.c_char_p * len(opts))(*opts)
            rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
            log = ""
            size = ctypes.c_size_t()
            if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0 and size.value > 1:
                buf = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, buf)
                log = buf.value.decode(errors="replace")
            self._check(rc, f"compiling the kernels for {target}", log)
            cubin = target.startswith("sm_")
            get_size = lib.nvrtcGetCUBINSize if cubin else lib.nvrtcGetPTXSize
            get = lib.nvrtcGetCUBIN if cubin else lib.nvrtcGetPTX
            self._check(get_size(prog, ctypes.byref(size)), "nvrtcGet*Size")
            buf = ctypes.create_string_buffer(size.value)
            self._check(get(prog, buf), "nvrtcGetCUBIN/PTX")
            return buf.raw
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def load_nvrtc(candidates: Optional[Sequence[str]] = None) -> Nvrtc:
    """The first NVRTC among ``candidates`` (default nvrtc_candidates()) that loads.
    RuntimeError listing where it looked and the remedy when none does."""
    cands = nvrtc_candidates() if candidates is None else list(candidates)
    errors = []
    for path in cands:
        try:
            return Nvrtc(path)
        except (OSError, AttributeError, RuntimeError) as exc:
            errors.append(f"{path}: {exc}")
    looked = "; ".join(errors) if errors else "no libnvrtc found in sys.path, CUDA_HOME, /usr/local/cuda or the loader path"
    raise RuntimeError(f"lpl_ext: NVRTC is not available ({looked}). Remedy: {NVRTC_REMEDY}")


def _nvrtc() -> Nvrtc:
    if _state["nvrtc"] is None:
        _state["nvrtc"] = load_nvrtc()
    return _state["nvrtc"]


def nvrtc_libraries() -> Iterator[Tuple[Optional[Nvrtc], str]]:
    """Every NVRTC that loads, (library, ""), the one in use first, then the other
    candidates in nvrtc_candidates() order; (None, why) when none loads. A driver may
    refuse one NVRTC's image (PTX or cubin newer than the driver) and accept another's."""
    try:
        first = _nvrtc()
    except RuntimeError as exc:
        yield None, str(exc)
        return
    yield first, ""
    seen = {os.path.realpath(first.path)}
    for path in nvrtc_candidates():
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            nv = Nvrtc(path)
        except (OSError, AttributeError, RuntimeError):
            continue
        if nv.version == first.version:  # the same compiler makes the same image
            continue
        yield nv, ""


def nvrtc_target(arch: int, supported: Sequence[int]) -> str:
    """"sm_<arch>" when NVRTC knows the architecture, else PTX for the newest one below
    it (the driver compiles that for the device); RuntimeError when none is."""
    if not supported or arch in supported:
        return f"sm_{arch}"
    lower = [a for a in supported if a <= arch]
    if not lower:
        raise RuntimeError(f"lpl_ext: this NVRTC compiles for sm_{min(supported)} and newer, the GPU is sm_{arch}")
    return f"compute_{max(lower)}"


def cache_dir(env: Optional[Dict[str, str]] = None) -> Path:
    env = os.environ if env is None else env
    root = env.get("LPL_EXT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lpl_ext")
    return Path(root) / "kernels"


def cache_key(source_sha256: str, target: str, nvrtc_version: Tuple[int, int]) -> str:
    """Cache file stem: changes with the sources, the target architecture, the NVRTC
    version and the compile options."""
    h = hashlib.sha256("|".join([source_sha256, target, "%d.%d" % tuple(nvrtc_version),
                                 *ks.COMMON_OPTIONS]).encode()).hexdigest()[:24]
    return f"lpl_kernels-{target}-nvrtc{nvrtc_version[0]}.{nvrtc_version[1]}-{h}"


def compile_cached(arch: int, nvrtc: Optional[Nvrtc] = None,
                   sources: Optional[Dict[str, bytes]] = None) -> Tuple[bytes, Path]:
    """Kernel image for sm_<arch> from the cache, or compiled by NVRTC and cached
    (written atomically; an unwritable cache only costs a recompile next time)."""
    nvrtc = _nvrtc() if nvrtc is None else nvrtc
    sources = kernel_sources()[0] if sources is None else sources
    target = nvrtc_target(arch, nvrtc.supported_archs())
    ext = ".cubin" if target.startswith("sm_") else ".ptx"
    path = cache_dir() / (cache_key(ks.source_hash(sources), target, nvrtc.version) + ext)
    if path.is_file():
        return path.read_bytes(), path
    image = nvrtc.compile(sources, target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(image)
        os.replace(tmp, path)
    except OSError:
        pass
    return image, path


# ---- the driver and the per-device kernels -----------------------------------------


def kernel_mode(env: Optional[Dict[str, str]] = None) -> str:
    env = os.environ if env is None else env
    mode = env.get("LPL_EXT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"LPL_EXT_KERNELS: unknown option {mode!r}; expected one of {', '.join(KERNEL_MODES)}")
    return mode


def kernel_set(env: Optional[Dict[str, str]] = None) -> str:
    """The kernel set LPL_EXT_KERNEL_SET names: "v2" (default, the current kernels) or
    "v1" (the 0.2 kernels, for the GPU comparison; docs/cuda.md, "Switches")."""
    env = os.environ if env is None else env
    name = env.get("LPL_EXT_KERNEL_SET", "v2").strip().lower() or "v2"
    if name not in KERNEL_SETS:
        raise ValueError(f"LPL_EXT_KERNEL_SET: unknown kernel set {name!r}; expected one of {', '.join(KERNEL_SETS)}")
    return name


def driver() -> Any:
    """The CUDA driver capsule (opened once per process)."""
    if _state["driver"] is None:
        _state["driver"] = _C.cuda_driver_open(os.environ.get("LPL_EXT_LIBCUDA", "libcuda.so.1"))
    return _state["driver"]


def load_kernels(ordinal: int, kernels: Optional[str] = None) -> Tuple[Any, str]:
    """(kernels capsule, where the image came from) for CUDA device ``ordinal``: a
    shipped cubin the driver loads, else NVRTC. RuntimeError naming each path tried.
    ``kernels``: the kernel set the capsule runs (default: LPL_EXT_KERNEL_SET's)."""
    mode = kernel_mode()
    set_code = KERNEL_SETS[kernels if kernels is not None else kernel_set()]
    drv = driver()
    attrs = _C.cuda_device_attributes(drv, ordinal)
    major, minor = attrs["major"], attrs["minor"]
    tried: List[str] = []
    if mode in ("auto", "cubin"):
        manifest = shipped_manifest()
        try:
            current = ks.source_hash(kernel_sources()[0])
        except RuntimeError:
            current = manifest.get("source_sha256")
        candidates = shipped_cubin_candidates(major, minor, manifest)
        if manifest.get("source_sha256") != current and candidates:
            tried.append("shipped cubins: built from other kernel sources than these (rebuild the package)")
        elif not candidates:
            have = ", ".join("sm_" + a for a in manifest.get("archs", {})) or "none"
            tried.append(f"shipped cubins: none for sm_{major}{minor} (shipped: {have})")
        else:
            for arch in candidates:
                try:
                    image = (KERNEL_DIR / manifest["archs"][arch]).read_bytes()
                    return _C.cuda_load_kernels(drv, ordinal, image, set_code), f"cubin sm_{arch} ({manifest.get('toolkit')})"
                except (OSError, RuntimeError) as exc:
                    tried.append(f"shipped cubin sm_{arch}: {exc}")
    if mode in ("auto", "nvrtc"):
        for nv, why in nvrtc_libraries():
            if nv is None:
                tried.append(f"NVRTC: {why}")
                break
            label = f"NVRTC {nv.version[0]}.{nv.version[1]}"
            try:
                image, path = compile_cached(major * 10 + minor, nv)
                kernels = _C.cuda_load_kernels(drv, ordinal, image, set_code)
            except RuntimeError as exc:
                tried.append(f"{label} ({nv.path}): {exc}")
                continue
            _state["nvrtc"] = nv  # the one the driver accepted serves the other devices too
            return kernels, f"{label} ({path.name})"
    raise RuntimeError(
        f"lpl_ext: no CUDA kernels for cuda:{ordinal} (compute capability {major}.{minor}, driver "
        f"{attrs['driver_version']}, LPL_EXT_KERNELS={mode}):\n  - " + "\n  - ".join(tried)
    )


def kernels_for(device: Any) -> Any:
    """The kernels capsule for a torch CUDA device (loaded once per device and kernel
    set, LPL_EXT_KERNEL_SET read at each call)."""
    ordinal = device.index if getattr(device, "index", None) is not None else 0
    key = (ordinal, kernel_set())
    kernels = _state["kernels"].get(key)
    if kernels is not None:
        return kernels
    with _lock:
        if key not in _state["kernels"]:
            _state["kernels"][key] = load_kernels(ordinal, key[1])[0]
        return _state["kernels"][key]


def status(probe_driver: bool = False) -> Dict[str, Any]:
    """Which CUDA paths exist: shipped cubin archs, kernel sources, NVRTC (version,
    path) and, with probe_driver, the driver (version or the reason it fails)."""
    manifest = shipped_manifest()
    info: Dict[str, Any] = {
        "cuda_cubin_archs": sorted(manifest.get("archs", {}), key=lambda a: int(a.rstrip("af"))),
        "cuda_cubin_toolkit": manifest.get("toolkit"),
    }
    try:
        kernel_sources()
        info["cuda_kernel_sources"] = True
    except RuntimeError:
        info["cuda_kernel_sources"] = False
    try:
        nv = _nvrtc()
        info["nvrtc"] = "%d.%d" % nv.version
        info["nvrtc_path"] = nv.path
    except RuntimeError:
        info["nvrtc"] = None
        info["nvrtc_path"] = None
    info["cuda"] = bool(info["cuda_cubin_archs"] or (info["nvrtc"] and info["cuda_kernel_sources"]))
    if probe_driver:
        try:
            info["cuda_driver"] = _C.cuda_device_attributes(driver(), 0)["driver_version"]
        except (RuntimeError, ValueError) as exc:
            info["cuda_driver"] = None
            info["cuda_driver_error"] = str(exc)
    return info
