"""Glue between Python objects and the flat C entry points of ``lpl_ext._C``.

Torch tensors cross as DLPack capsules (borrowed by the C side for the call), numpy
arrays through the NumPy C API. Outputs are allocated here, with torch's caching
allocator on GPU, and the current CUDA stream is passed down explicitly.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Set

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


# ---------------------------------------------------------------------- backend choice
BACKEND_ENV = "LPL_EXT_BACKEND"
BACKENDS = ("auto", "native", "torch")


class BackendFallbackWarning(UserWarning):
    """Issued once per device type when ``LPL_EXT_BACKEND=auto`` runs lpl_ext's
    plain-PyTorch implementation because no lpl_ext kernel serves that device."""


_fallback_warned: Set[str] = set()


def requested_backend() -> str:
    """``LPL_EXT_BACKEND`` (read at every call, so it can be changed at run time):
    "auto" (default: the C/CUDA kernels where they exist, the plain-PyTorch backend on
    every other device), "native" (the kernels only; other devices raise) or "torch"
    (the plain-PyTorch backend everywhere)."""
    raw = os.environ.get(BACKEND_ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {', '.join(BACKENDS)} (or unset), got {raw!r}")
    return value


def native_kernels_problem(device: Any) -> Optional[str]:
    """None where lpl_ext's kernels can serve tensors on ``device``, else why not.

    CPU: the C kernels. CUDA: the CUDA kernels, except under a ROCm build of torch
    (``torch.version.hip``), whose "cuda" tensors are AMD GPU memory that DLPack labels
    kDLROCM and that the NVIDIA kernels cannot touch. Every other device type (mps,
    xpu, ...) has no lpl_ext kernel."""
    kind = torch.device(device).type
    if kind == "cpu":
        return None
    if kind == "cuda":
        hip = getattr(torch.version, "hip", None)
        if hip:
            return (f"this torch is a ROCm build (HIP {hip}): its cuda tensors live on an AMD GPU "
                    "(DLPack kDLROCM), and lpl_ext's CUDA kernels run on NVIDIA GPUs only")
        return None
    return f"lpl_ext has no kernels for {kind} tensors (only CPU and NVIDIA CUDA)"


def use_native_kernels(device: Any) -> bool:
    """Whether a call on tensors of ``device`` runs the C/CUDA kernels (True) or the
    plain-PyTorch backend ``lpl_ext._torch_backend`` (False), per ``LPL_EXT_BACKEND``.
    With "auto", a device without kernels falls back with a one-time
    :class:`BackendFallbackWarning` naming it; with "native" it raises RuntimeError."""
    requested = requested_backend()
    if requested == "torch":
        return False
    problem = native_kernels_problem(device)
    if problem is None:
        return True
    if requested == "native":
        raise RuntimeError(f"{BACKEND_ENV}=native: {problem}. Unset {BACKEND_ENV} (or set it to auto or "
                           "torch) to run lpl_ext's plain-PyTorch implementation there.")
    label = str(torch.device(device).type) + (" (ROCm)" if torch.device(device).type == "cuda" else "")
    if label not in _fallback_warned:
        _fallback_warned.add(label)
        warnings.warn(f"lpl_ext: {problem}; running lpl_ext's plain-PyTorch implementation of the same "
                      f"arithmetic on {label} tensors (slower than the kernels, same results to reduction "
                      f"order; docs/switching.md). Set {BACKEND_ENV}=torch to choose it explicitly.",
                      BackendFallbackWarning, stacklevel=2)
    return False


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
