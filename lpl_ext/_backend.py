"""Where lpl_ext's ops run: torch (optional), the torch it needs, and the backend policy.

torch is optional (numpy inputs work without it); where it is installed it must have
``torch.library.custom_op`` (torch >= 2.4), which declares the ops (``lpl_ext._ops``).
``LPL_EXT_BACKEND`` and the device decide between the C/CUDA kernels and the plain-PyTorch
backend (docs/switching.md, "Backends and devices"); ``lpl_ext._launch`` asks
:func:`use_native_kernels`, once per call, and nothing else makes that choice.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Set

from . import _C

#: The oldest torch lpl_ext runs with: the first with torch.library.custom_op,
#: register_fake and register_autograd (what lpl_ext._ops declares the ops with).
TORCH_FLOOR = "2.4"
_TORCH_LIBRARY_API = ("custom_op", "register_fake", "register_autograd")


def check_torch(module: Any) -> None:
    """ImportError naming the floor unless the torch ``module`` has the torch.library API
    the ops are declared with (torch >= 2.4)."""
    library = getattr(module, "library", None)
    missing = [name for name in _TORCH_LIBRARY_API if not hasattr(library, name)]
    if missing:
        raise ImportError(
            f"lpl_ext needs torch >= {TORCH_FLOOR} (torch.library.{', torch.library.'.join(missing)} "
            f"missing), found torch {getattr(module, '__version__', '?')}. Upgrade torch (pip install "
            f"'torch>={TORCH_FLOOR}'), or uninstall it to use lpl_ext's numpy API alone.")


try:  # torch is optional: numpy inputs work without it
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]
else:
    check_torch(torch)


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
