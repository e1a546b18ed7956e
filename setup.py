"""Build lpl_ext._C with plain setuptools: C11 sources against the CPython and NumPy C
APIs, plus CUDA sources compiled by nvcc when it is available.

Environment switches:
  LPL_EXT_CUDA=auto|0|1     build the CUDA kernels: when nvcc is found (default), never,
                            or always (fails when nvcc is missing).
  LPL_EXT_CUDA_ARCHS="80;86;89;90"   SM architectures; PTX of the highest is embedded too.
  LPL_EXT_SANITIZE=1        AddressSanitizer + UndefinedBehaviorSanitizer for the C sources.
  CUDA_HOME / CUDA_PATH     CUDA toolkit root (else found from nvcc on PATH, then /usr/local/cuda).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;86;89;90"


def _log(msg: str) -> None:
    print(f"[lpl_ext build] {msg}", file=sys.stderr, flush=True)


def _find_cuda() -> tuple[str, Path] | None:
    """(nvcc, toolkit root) or None. The root is where include/cuda_runtime.h and the
    static runtime live; an nvcc on PATH may be a wrapper script outside the toolkit."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        homes.append(str(Path(on_path).resolve().parent.parent))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        root = Path(home)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root / "bin" / "nvcc"), root
    return None


def _cuda_mode() -> str:
    mode = os.environ.get("LPL_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LPL_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _cuda_archs() -> list[str]:
    raw = os.environ.get("LPL_EXT_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "").replace("sm_", "") for a in raw.replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    for a in archs:
        if not a.rstrip("a").isdigit():
            raise SystemExit(f"LPL_EXT_CUDA_ARCHS: bad architecture {a!r} in {raw!r}")
    return archs


def _sanitize() -> bool:
    return os.environ.get("LPL_EXT_SANITIZE", "0").strip() not in ("", "0")


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects linked into the extension."""

    def build_extension(self, ext: Extension) -> None:
        mode = _cuda_mode()
        cuda = _find_cuda() if mode != "0" else None
        if mode == "1" and cuda is None:
            raise SystemExit("LPL_EXT_CUDA=1 but no CUDA toolkit (nvcc + headers) was found; set CUDA_HOME")
        if cuda is not None:
            self._add_cuda(ext, *cuda)
        else:
            _log("building without CUDA" + (" (LPL_EXT_CUDA=0)" if mode == "0" else " (nvcc not found)"))
        super().build_extension(ext)

    def _add_cuda(self, ext: Extension, nvcc: str, cuda_home: Path) -> None:
        archs = _cuda_archs()
        gencode: list[str] = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in sorted((CSRC / "cuda").glob("*.cu")):
            obj = build_dir / (src.stem + ".o")
            deps = [src, *CSRC.glob("*.h"), *(CSRC / "cuda").glob("*.cuh")]
            if obj.exists() and obj.stat().st_mtime > max(d.stat().st_mtime for d in deps):
                objects.append(str(obj))  # up to date: nvcc is slow
                continue
            cmd = [
                nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17",
                "-Xcompiler", "-fPIC", "-I", str(CSRC), "--expt-relaxed-constexpr",
                "-DLPL_WITH_CUDA", *gencode,
            ]
            _log(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = list(ext.extra_objects or []) + objects
        lib_dirs = [d for d in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib") if d.exists()]
        ext.library_dirs = list(ext.library_dirs or []) + [str(d) for d in lib_dirs]
        # The runtime is linked statically: the module imports on machines without a CUDA
        # toolkit, and without a driver it still runs its CPU paths (the driver is only
        # loaded when a CUDA kernel is first launched).
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "dl", "pthread", "rt", "stdc++"]
        ext.define_macros = list(ext.define_macros or []) + [
            ("LPL_WITH_CUDA", "1"),
            ("LPL_CUDA_ARCHS", '"' + ";".join(archs) + '"'),
        ]
        _log(f"building with CUDA from {cuda_home}, archs {';'.join(archs)} + PTX")


def _extension() -> Extension:
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.c"))
    cc = os.environ.get("CC", "cc")
    compile_args = ["-std=c11", "-O3", "-fopenmp", "-Wall", "-Wextra", "-ffp-contract=off", "-fno-math-errno"]
    link_args = ["-fopenmp"]
    macros = [("LPL_COMPILER", '"' + cc + '"')]
    if _sanitize():
        compile_args = [a for a in compile_args if a != "-O3"] + [
            "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined,float-cast-overflow",
            # CPython's own flags carry -fwrapv, which hides signed overflow from UBSan
            "-fno-wrapv", "-fno-sanitize-recover=all",
        ]
        link_args += ["-fsanitize=address,undefined"]
        macros.append(("LPL_SANITIZE", "1"))
    return Extension(
        "lpl_ext._C",
        sources=sources,
        include_dirs=[numpy.get_include(), str(CSRC)],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=[str(p.relative_to(ROOT)) for p in CSRC.rglob("*.h")],
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
