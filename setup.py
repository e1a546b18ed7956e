"""Build lpl_ext._C with plain setuptools: C11 sources against the CPython and NumPy C
APIs. CUDA needs no toolkit at build time: the module launches kernels through the
driver API (libcuda, opened at run time) from a cubin shipped with the package, or one
that NVRTC compiles from the shipped kernel sources at first use (docs/cuda.md).

The kernels ship as package data of lpl_ext (``lpl_ext/_kernels/``: the sources and, with
nvcc, one cubin per architecture), made by ``build_py`` (a wheel's build folder; the source
tree for an editable install) and by ``build_ext --inplace`` (the source tree).

Environment switches (LPL_EXT_CUDA, LPL_EXT_CUDA_ARCHS, LPL_EXT_SANITIZE, NVCC, CUDA_HOME /
CUDA_PATH): docs/cuda.md, "Switches".
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;86;89;90;100;110;120"


def _kernel_sources_module():
    """lpl_ext/_kernel_sources.py, loaded alone (the package cannot import before _C)."""
    spec = importlib.util.spec_from_file_location("_lpl_kernel_sources", ROOT / "lpl_ext" / "_kernel_sources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _log(msg: str) -> None:
    print(f"[lpl_ext build] {msg}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    if "NVCC" in os.environ:  # an explicit choice; a path that does not exist means "no nvcc"
        return os.environ["NVCC"] if Path(os.environ["NVCC"]).is_file() else None
    for home in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"))):
        if (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


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
        if not a.rstrip("af").isdigit():
            raise SystemExit(f"LPL_EXT_CUDA_ARCHS: bad architecture {a!r} in {raw!r}")
    if not archs:
        raise SystemExit(f"LPL_EXT_CUDA_ARCHS: no architecture in {raw!r}")
    return archs


def _sanitize() -> bool:
    return os.environ.get("LPL_EXT_SANITIZE", "0").strip() not in ("", "0")


KERNEL_PACKAGE_DIR = ROOT / "lpl_ext" / "_kernels"


def write_kernels(kernel_dir: Path) -> None:
    """Fills ``kernel_dir`` (lpl_ext/_kernels of a build or of the source tree) with the CUDA
    kernel sources (NVRTC's input), one cubin per architecture when nvcc is found, and the
    manifest naming them; nothing under LPL_EXT_CUDA=0. What was there is replaced (a cubin
    of other sources must not ship), except that cubins of the same sources and nvcc are
    reused (nvcc is slow)."""
    mode = _cuda_mode()
    previous = {}
    # LPL_EXT_REUSE_CUBINS_FROM: another build's lpl_ext/_kernels whose cubins are reused on the
    # same terms (same kernel sources and nvcc release), e.g. a wheel built from the sdist of a
    # checkout that built them already (tests/dist_install_run.sh)
    for source in (kernel_dir, Path(os.environ.get("LPL_EXT_REUSE_CUBINS_FROM") or kernel_dir)):
        if not previous and (source / "manifest.json").is_file():
            previous = json.loads((source / "manifest.json").read_text())
            previous["cubins"] = {a: (source / n).read_bytes() for a, n in previous["archs"].items()
                                  if (source / n).is_file()}
    if kernel_dir.exists():
        shutil.rmtree(kernel_dir)
    if mode == "0":
        _log("LPL_EXT_CUDA=0: no CUDA kernels (CUDA tensors will be refused)")
        return
    ks = _kernel_sources_module()
    try:
        sources = ks.read_sources(CSRC, ks.REPO_LAYOUT)
    except FileNotFoundError as exc:
        raise SystemExit(f"lpl_ext build: {exc} (an incomplete source tree or sdist); "
                         "set LPL_EXT_CUDA=0 to build without CUDA") from None
    kernel_dir.mkdir(parents=True)
    for name, data in sources.items():
        (kernel_dir / name).write_bytes(data)
    manifest = {"source_sha256": ks.source_hash(sources), "toolkit": None, "archs": {}}
    nvcc = _find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise SystemExit("LPL_EXT_CUDA=1 but nvcc was not found; set CUDA_HOME or put nvcc on PATH")
        _log("nvcc not found: no cubins shipped; CUDA kernels will be compiled by NVRTC at first use")
    else:
        same_sources = previous.get("source_sha256") == manifest["source_sha256"]
        manifest["toolkit"], manifest["archs"] = _build_cubins(nvcc, ks, kernel_dir, previous if same_sources else {})
    (kernel_dir / ks.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _build_cubins(nvcc: str, ks, kernel_dir: Path, previous: dict) -> tuple[str, dict]:
    """(toolkit, {arch: cubin file}) of the cubins nvcc makes in kernel_dir (``previous``'s
    reused when the toolkit is the same)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    toolkit = m.group(1) if m else "unknown"
    listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    known = set(re.findall(r"sm_(\w+)", listed.stdout)) if listed.returncode == 0 else None
    archs = []
    for a in _cuda_archs():
        if known is not None and a not in known:
            _log(f"nvcc {toolkit} does not know sm_{a}: skipped (NVRTC covers it at run time)")
        else:
            archs.append(a)

    reuse = previous.get("cubins", {}) if previous.get("toolkit") == toolkit else {}

    def build(arch: str) -> tuple[str, str]:
        name = ks.cubin_name(arch)
        if arch in reuse:
            (kernel_dir / name).write_bytes(reuse[arch])
            _log(f"sm_{arch}: cubin of the same sources and nvcc {toolkit} reused")
            return arch, name
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", *ks.COMMON_OPTIONS, "-I", str(CSRC),
               "-I", str(CSRC / "cuda"), str(CSRC / ks.REPO_LAYOUT[ks.MAIN]), "-o", str(kernel_dir / name)]
        _log(" ".join(cmd))
        subprocess.check_call(cmd)
        return arch, name

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        built = dict(pool.map(build, archs))
    _log(f"building with CUDA: cubins for {', '.join('sm_' + a for a in archs)} from nvcc {toolkit}")
    return toolkit, built


class BuildPy(build_py):
    """build_py that also makes the kernels (package data lpl_ext/_kernels/, declared in
    pyproject.toml): into the build folder that becomes the wheel, or, for an editable
    install (where build_py copies nothing: the package is the source folder), into the
    source tree, before setuptools lists the package's files."""

    def _kernel_dir(self) -> Path:
        return KERNEL_PACKAGE_DIR if self.editable_mode else Path(self.build_lib) / "lpl_ext" / "_kernels"

    def run(self) -> None:
        super().run()
        write_kernels(self._kernel_dir())

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        made = [str(f) for f in sorted(self._kernel_dir().glob("*"))]
        return outputs + [f for f in made if f not in outputs]


class BuildExt(build_ext):
    """build_ext that, for ``setup.py build_ext --inplace`` (no build_py runs), also makes
    the kernels next to the in-place module. Editable installs make them in BuildPy."""

    def run(self) -> None:
        super().run()
        if self.inplace and not self.editable_mode:
            write_kernels(KERNEL_PACKAGE_DIR)


def _revision() -> str:
    """The source revision this build comes from: git's, in a checkout (with -dirty for
    uncommitted changes to tracked files), else the REVISION file an sdist carries."""
    if (ROOT / ".git").exists():
        try:
            head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=20)
            if head.returncode == 0:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=20).stdout.strip()
                return head.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    rev = ROOT / "REVISION"
    return rev.read_text().strip() if rev.is_file() else "unknown"


class Sdist(sdist):
    """Writes the source revision into the sdist (REVISION), for builds made from it."""

    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        (Path(base_dir) / "REVISION").write_text(_revision() + "\n")


def _extension() -> Extension:
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.c"))
    cc = os.environ.get("CC", "cc")
    compile_args = ["-std=c11", "-O3", "-fopenmp", "-Wall", "-Wextra", "-ffp-contract=off", "-fno-math-errno"]
    link_args = ["-fopenmp", "-ldl"]
    macros = [("LPL_COMPILER", '"' + cc + '"'), ("LPL_REVISION", '"' + _revision() + '"')]
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
        depends=[str(p.relative_to(ROOT)) for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cu")],
    )


setup(ext_modules=[_extension()], cmdclass={"build_py": BuildPy, "build_ext": BuildExt, "sdist": Sdist})
