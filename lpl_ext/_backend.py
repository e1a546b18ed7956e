"""Glue between Python objects and the flat C entry points of ``lpl_ext._C``.

Torch tensors cross as DLPack capsules (borrowed by the C side for the call), numpy
arrays through the NumPy C API. Outputs are allocated here, with torch's caching
allocator on GPU, and the current CUDA stream is passed down explicitly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _C

try:  # torch is optional: numpy inputs work without it
    import torch
    from torch.utils.dlpack import to_dlpack as _to_dlpack
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]
    _to_dlpack = None  # type: ignore[assignment]


def is_tensor(obj: Any) -> bool:
    """True for a torch.Tensor (False when torch is not installed)."""
    return torch is not None and isinstance(obj, torch.Tensor)


def as_c_arg(t: Any) -> Any:
    """What the C entry points take for ``t``: a DLPack capsule of a torch tensor (the
    memory is shared, so outputs written through it land in ``t``), a numpy array as is,
    or None."""
    if t is None or isinstance(t, np.ndarray):
        return t
    if is_tensor(t):
        return _to_dlpack(t.detach())
    return t


def stream_of(t: Any) -> int:
    """The current CUDA stream handle of ``t``'s device, 0 for CPU tensors and arrays."""
    if is_tensor(t) and t.is_cuda:
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return 0


def check_kind(name: str, obj: Any) -> None:
    """Raise TypeError unless obj is a torch.Tensor or numpy.ndarray."""
    if not (is_tensor(obj) or isinstance(obj, np.ndarray)):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")


def cuda_kernels(device: Any) -> Any:
    """The loaded CUDA kernels for a torch CUDA device (``_C`` takes them as ``kernels=``);
    RuntimeError naming what is missing when no kernel image can be had (docs/cuda.md)."""
    from . import _cuda

    return _cuda.kernels_for(device)


def build_info() -> dict:
    """How the extension was built and which CUDA paths exist.

    Keys: ``version``, ``revision`` (the source revision it was built from), ``cuda`` (CUDA kernels can be had: shipped cubins, or NVRTC found and the kernel
    sources installed), ``cuda_cubin_archs`` / ``cuda_cubin_toolkit`` (shipped cubins and
    the nvcc that built them), ``nvrtc`` / ``nvrtc_path`` (the NVRTC found, or None),
    ``cuda_available`` (torch sees a GPU and ``cuda``), ``cuda_driver`` (the driver
    version, when torch sees a GPU), plus the C build's ``openmp``, ``sanitize``, ..."""
    from . import _cuda

    from ._version import __version__

    info = {"version": __version__, **_C.build_info()}
    gpu = torch is not None and torch.cuda.is_available()
    info.update(_cuda.status(probe_driver=gpu))
    info["cuda_available"] = bool(info["cuda"] and gpu)
    return info
