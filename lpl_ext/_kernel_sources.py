"""The CUDA kernel sources and how they are compiled: one definition for the build
(setup.py loads this file on its own, before lpl_ext exists) and for NVRTC at run time
(lpl_ext/_cuda.py). Standard library only."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Mapping

#: The translation unit; it includes the other files by bare name.
MAIN = "lpl_kernels.cu"

#: Each kernel source file and where it lives in the repository's csrc/ folder. Built
#: packages carry them flat in lpl_ext/_kernels/ (NVRTC's input).
REPO_LAYOUT: Dict[str, str] = {
    "lpl_kernels.cu": "cuda/lpl_kernels.cu",
    "feature_distance_kernels.cuh": "cuda/feature_distance_kernels.cuh",
    "outlier_mask_kernels.cuh": "cuda/outlier_mask_kernels.cuh",
    "scale_kernels.cuh": "cuda/scale_kernels.cuh",
    "v1_feature_distance_kernels.cuh": "cuda/v1_feature_distance_kernels.cuh",
    "v1_outlier_mask_kernels.cuh": "cuda/v1_outlier_mask_kernels.cuh",
    "lpl_device.cuh": "cuda/lpl_device.cuh",
    "lpl_kernel_abi.h": "lpl_kernel_abi.h",
    "lpl_math.h": "lpl_math.h",
}

#: Options with the same meaning for nvcc and NVRTC. -fmad=false: no FMA contraction,
#: as the CPU build's -ffp-contract=off, so both round every product and sum alike
#: (docs/spec.md, "CPU and GPU agree").
COMMON_OPTIONS = ("-std=c++17", "-fmad=false")

#: File name of the shipped cubin for an architecture such as "90".
def cubin_name(arch: str) -> str:
    return f"lpl_kernels.sm_{arch}.cubin"


MANIFEST = "manifest.json"


def read_sources(folder: Path, layout: Mapping[str, str] | None = None) -> Dict[str, bytes]:
    """{name: bytes} of every kernel source under ``folder`` (``layout`` maps names to
    relative paths; flat when None). FileNotFoundError names the first missing file."""
    out: Dict[str, bytes] = {}
    for name in REPO_LAYOUT:
        rel = (layout or {}).get(name, name)
        path = Path(folder) / rel
        if not path.is_file():
            raise FileNotFoundError(f"CUDA kernel source missing: {path}")
        out[name] = path.read_bytes()
    return out


def source_hash(sources: Mapping[str, bytes]) -> str:
    """sha256 over the names and contents of the kernel sources (the cache key's base)."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + str(len(sources[name])).encode() + b"\0" + sources[name])
    return h.hexdigest()
