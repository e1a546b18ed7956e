"""The launch layer of each op: which implementation runs, its outputs, workspace and
stream, and the one ``lpl_ext._C`` call.

Layers, one way (docs/api.md, "Layers of an op"): a public function (``lpl_ext.feature_distance``,
``lpl_ext.outlier_mask``: validates and converts once) -> the operator declared in
``lpl_ext._ops`` (schema, fake, autograd; torch tensors) -> this module -> ``_C`` (the
C/CUDA kernels) or ``lpl_ext._torch_backend``. Nothing here imports a layer above it.

The implementation is chosen here, once per call: ``_backend.use_native_kernels`` for
torch tensors (``LPL_EXT_BACKEND`` and the device), then the device's trailing ``_C``
arguments from :func:`_device_args` (none on the CPU; stream, workspace and kernels on
CUDA). The C entry points run the implementation of the memory the capsules describe and
refuse arguments that do not fit it (docs/cuda.md, "The flat C entry points").

Arguments arrive validated (``lpl_ext._options``); torch tensors are made contiguous here,
numpy arrays native-endian, aligned and C-contiguous.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np

from . import _C
from ._backend import torch, use_native_kernels

if torch is not None:
    from torch.utils.dlpack import to_dlpack as _to_dlpack

    from . import _torch_backend


# ---------------------------------------------------------------------- arguments of _C


def as_c_arg(t: Any) -> Any:
    """What the C entry points take for ``t``: a DLPack capsule of a torch tensor (the
    memory is shared, so outputs written through it land in ``t``), a numpy array as is,
    or None."""
    if t is None or isinstance(t, np.ndarray):
        return t
    return _to_dlpack(t.detach())


def native_contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` native-endian, aligned and C-contiguous (a copy only where it is not)."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    # a copy also realigns misaligned buffers (views into byte arrays)
    return np.require(a, requirements=["C", "A"])


def _device_args(t: "torch.Tensor", workspace: Callable[[], "torch.Tensor"]) -> Tuple[Any, ...]:
    """The trailing ``_C`` arguments for tensors on ``t``'s device: none on the CPU, the
    current stream, a workspace from torch's caching allocator and the device's loaded
    kernels on CUDA (RuntimeError naming what is missing when no kernel image can be had,
    docs/cuda.md)."""
    if t.device.type != "cuda":
        return ()
    from . import _cuda

    stream = int(torch.cuda.current_stream(t.device).cuda_stream)
    return stream, as_c_arg(workspace()), _cuda.kernels_for(t.device)


# ---------------------------------------------------------------------- feature distance


def feature_distance(
    x: "torch.Tensor", y: "torch.Tensor", mask: Optional["torch.Tensor"], norm: str, distance: str,
    weight: float, need_grad: bool,
) -> Tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """Loss (N,) in x's dtype and, when ``need_grad``, d(sum loss)/dx (x's shape and dtype,
    C-contiguous), else None. x, y (N, C, H, W) float tensors of one dtype and device,
    mask bool/uint8 of x's shape or None."""
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    if mask is not None:
        mask = mask.detach().contiguous()
    if not use_native_kernels(x.device):
        loss, grad = _torch_backend.feature_distance(x, y, mask, norm, distance, weight, need_grad)
        return loss.to(x.dtype), grad
    loss = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    grad = torch.empty_like(x) if need_grad else None
    n, c = x.shape[0], x.shape[1]
    device_args = _device_args(
        x, lambda: torch.empty(_C.feature_distance_workspace(n, c), dtype=torch.float64, device=x.device))
    if device_args and x.numel() == 0:
        loss.zero_()  # nothing to launch on the device: every plane is empty
    else:
        _C.feature_distance(as_c_arg(x), as_c_arg(y), as_c_arg(mask), as_c_arg(loss), as_c_arg(grad),
                            norm, distance, weight, *device_args)
    return loss.to(x.dtype), grad


def feature_distance_numpy(
    x: np.ndarray, y: np.ndarray, mask: Optional[np.ndarray], norm: str, distance: str, weight: float,
) -> np.ndarray:
    """The C kernel on numpy arrays (no gradient): loss (N,) in x's dtype."""
    x, y = native_contiguous(x), native_contiguous(y)
    if mask is not None:
        mask = native_contiguous(mask)
    loss = np.empty(x.shape[0], dtype=np.float64)
    _C.feature_distance(x, y, mask, loss, None, norm, distance, weight)
    return loss.astype(x.dtype)


# ---------------------------------------------------------------------- outlier mask


def outlier_mask(
    y: "torch.Tensor", quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """(keep bool of y's shape, stats (3,) = mean, std, outlier ratio, or None) for a 4-D
    float tensor y. stats are float64, float32 from the plain-PyTorch backend on a device
    without float64."""
    y = y.detach().contiguous()
    if not use_native_kernels(y.device):
        return _torch_backend.outlier_mask(y, quantile, margin_std, closing, opening, return_stats)
    keep = torch.empty(y.shape, dtype=torch.bool, device=y.device)
    stats = torch.empty(3, dtype=torch.float64, device=y.device) if return_stats else None
    device_args = _device_args(
        y, lambda: torch.empty(_C.outlier_mask_workspace_bytes(*y.shape), dtype=torch.uint8, device=y.device))
    _C.outlier_mask(as_c_arg(y), as_c_arg(keep), as_c_arg(stats), quantile, margin_std, closing, opening,
                    *device_args)
    return keep, stats


def outlier_mask_numpy(
    y: np.ndarray, quantile: float, margin_std: float, closing: int, opening: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """The C kernel on a numpy array: (keep bool of y's shape, stats (3,) float64)."""
    y = native_contiguous(y)
    keep = np.empty(y.shape, dtype=np.bool_)
    stats = np.empty(3, dtype=np.float64)
    _C.outlier_mask(y, keep, stats, quantile, margin_std, closing, opening)
    return keep, stats
