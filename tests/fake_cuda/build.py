"""Builds the stand-in libcuda.so.1 with the emulated device (docs/cuda.md, "The emulated
device"): tests/fake_cuda/fake_libcuda.c (the driver API) + tests/emu/lpl_emu_runtime.cpp
(threads, barriers, counters) + the kernels of csrc/cuda/ compiled as host C++ on
tests/emu/lpl_emu.cuh. The tests build it into their temporary folder (cached per
content); also a command line:

    python tests/fake_cuda/build.py [--sanitize thread|address] [--csrc DIR] [--out DIR]

prints the path of the library. ``--sanitize``: a ThreadSanitizer or AddressSanitizer +
UBSan build (the process must preload the runtime: tests/emu/run_sanitized.sh does).
``--csrc``: kernel sources from another tree (the mutation check builds its mutants so).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent.parent
FAKE = ROOT / "tests" / "fake_cuda"
EMU = ROOT / "tests" / "emu"
SANITIZERS = (None, "thread", "address")

#: The kernel sources, as tests/emu/lpl_emu_kernels.cpp includes them (csrc/ layout): the
#: package's one list (lpl_ext/_kernel_sources.py, loaded alone like setup.py does).
def _kernel_files() -> tuple:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lpl_kernel_sources", ROOT / "lpl_ext" / "_kernel_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.REPO_LAYOUT.values())


KERNEL_FILES = _kernel_files()
EMU_FILES = ("lpl_emu.cuh", "lpl_emu_api.h", "lpl_emu_kernels.cpp", "lpl_emu_runtime.cpp")

# Floating point as the CPU build (setup.py: -ffp-contract=off) and the GPU (-fmad=false):
# every product and sum rounded on its own (docs/spec.md, "CPU and GPU agree").
_FP = ["-ffp-contract=off", "-fno-math-errno"]


def _flags(sanitize: Optional[str]) -> Dict[str, List[str]]:
    if sanitize is None:
        opt = ["-O2"]
    elif sanitize == "thread":
        opt = ["-O1", "-g", "-fsanitize=thread"]
    elif sanitize == "address":
        opt = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined,float-cast-overflow",
               "-fno-sanitize-recover=all"]
    else:
        raise ValueError(f"sanitize: expected one of {SANITIZERS}, got {sanitize!r}")
    common = ["-fPIC", "-Wall", "-Wextra", *opt, *_FP]
    return {
        "cxx": ["-std=c++17", "-fvisibility=hidden", *common],
        "cc": ["-std=c11", *common],
        "ld": ["-shared", "-pthread", "-Wl,-z,nodelete", *[f for f in opt if f.startswith("-fsanitize")]],
    }


def _compilers() -> Dict[str, str]:
    return {"cc": os.environ.get("CC", "cc"), "cxx": os.environ.get("CXX", "g++"),
            "objcopy": os.environ.get("OBJCOPY", "objcopy"), "nm": os.environ.get("NM", "nm")}


def cache_key(csrc: Path, sanitize: Optional[str]) -> str:
    """Hash of every input of the build: sources, flags and compilers."""
    h = hashlib.sha256()
    tools = _compilers()
    for name in ("cc", "cxx"):
        version = subprocess.run([tools[name], "--version"], capture_output=True, text=True).stdout
        h.update(version.encode())
    h.update(repr(_flags(sanitize)).encode())
    for path in ([FAKE / "fake_libcuda.c", Path(__file__)] + [EMU / f for f in EMU_FILES]
                 + [csrc / f for f in KERNEL_FILES]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


def _run(cmd: List[str], log: List[str]) -> None:
    log.append(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulated device build failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.stderr.strip():  # -Wall -Wextra clean
        raise RuntimeError(f"emulated device build warned: {' '.join(cmd)}\n{proc.stderr}")


def _check_shared_section(obj: Path, tools: Dict[str, str]) -> None:
    """The renamed .bss of the kernels must hold only function-local statics (the
    __shared__ variables): anything else would be poisoned at every block start."""
    out = subprocess.run([tools["nm"], "--defined-only", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    bad = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] in ("b", "B") and not fields[2].startswith("_ZZ"):
            bad.append(fields[2])
    if bad:
        raise RuntimeError("lpl_emu_kernels.o: data other than __shared__ statics in its .bss: " + ", ".join(bad))


def build_dir(session_tmp: Path) -> Path:
    """Where the tests build: $LPL_EMU_BUILD_DIR (shared by a CI run's steps), else the
    pytest session's temporary folder."""
    return Path(os.environ.get("LPL_EMU_BUILD_DIR") or Path(session_tmp) / "fake_cuda")


def build(out_dir: Path, sanitize: Optional[str] = None, csrc: Path = ROOT / "csrc") -> Path:
    """libcuda.so.1 with the emulated device under out_dir/<key>/ (reused when the same
    inputs were built before). Returns its path."""
    csrc = Path(csrc)
    key = cache_key(csrc, sanitize)
    target = Path(out_dir) / f"{sanitize or 'plain'}-{key}" / "libcuda.so.1"
    if target.is_file():
        return target
    tools, flags = _compilers(), _flags(sanitize)
    target.parent.mkdir(parents=True, exist_ok=True)
    log: List[str] = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        t = Path(tmp)
        inc = ["-I", str(EMU), "-I", str(csrc), "-I", str(csrc / "cuda")]
        jobs = [
            [tools["cxx"], *flags["cxx"], *inc, "-c", str(EMU / "lpl_emu_kernels.cpp"), "-o", str(t / "kernels.o")],
            [tools["cxx"], *flags["cxx"], *inc, "-c", str(EMU / "lpl_emu_runtime.cpp"), "-o", str(t / "runtime.o")],
            [tools["cc"], *flags["cc"], "-I", str(EMU), "-c", str(FAKE / "fake_libcuda.c"), "-o", str(t / "driver.o")],
        ]
        with ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda cmd: _run(cmd, log), jobs))
        _check_shared_section(t / "kernels.o", tools)
        # the kernels' __shared__ statics are the .bss of their object: a section of their own,
        # whose __start_/__stop_ symbols the runtime poisons between (lpl_emu_runtime.cpp)
        _run([tools["objcopy"], "--rename-section", ".bss=lpl_emu_shared", str(t / "kernels.o")], log)
        _run([tools["cxx"], *flags["ld"], "-o", str(t / "libcuda.so.1"), str(t / "driver.o"), str(t / "runtime.o"),
              str(t / "kernels.o")], log)
        (t / "build.log").write_text("\n".join(log) + "\n")
        shutil.move(str(t / "build.log"), str(target.parent / "build.log"))
        os.replace(t / "libcuda.so.1", target)  # atomic: a concurrent build finds a whole file
    return target


def sanitizer_runtime(sanitize: str) -> List[str]:
    """Paths of the sanitizer runtimes a process must preload for a sanitized build."""
    cc = _compilers()["cxx"]
    names = {"thread": ["libtsan.so"], "address": ["libasan.so", "libubsan.so"]}[sanitize]
    paths = [subprocess.run([cc, f"-print-file-name={n}"], capture_output=True, text=True, check=True).stdout.strip()
             for n in names]
    for p in paths:
        if not os.path.isabs(p) or not os.path.exists(p):
            raise RuntimeError(f"sanitizer runtime not found: {p}")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sanitize", choices=["thread", "address"], default=None)
    p.add_argument("--csrc", default=str(ROOT / "csrc"))
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lpl_fake_cuda"))
    p.add_argument("--print-runtime", action="store_true", help="print the sanitizer runtimes to preload instead")
    args = p.parse_args(argv)
    if args.print_runtime:
        print(":".join(sanitizer_runtime(args.sanitize)))
        return 0
    print(build(Path(args.out), args.sanitize, Path(args.csrc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
