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


def _device_args(t: "torch.Tensor", workspace: Optional[Callable[[], "torch.Tensor"]]) -> Tuple[Any, ...]:
    """The trailing ``_C`` arguments for tensors on ``t``'s device: none on the CPU, the
    current stream, a workspace from torch's caching allocator (when the op takes one) and
    the device's loaded kernels on CUDA (RuntimeError naming what is missing when no
    kernel image can be had, docs/cuda.md)."""
    if t.device.type != "cuda":
        return ()
    from . import _cuda

    stream = int(torch.cuda.current_stream(t.device).cuda_stream)
    kernels = _cuda.kernels_for(t.device)
    return (stream, kernels) if workspace is None else (stream, as_c_arg(workspace()), kernels)


# ---------------------------------------------------------------------- feature distance


def feature_distance(
    x: "torch.Tensor", y: "torch.Tensor", mask: Optional["torch.Tensor"], norm: str, distance: str,
    weight: float, need_grad: bool, grad_scale: Optional["torch.Tensor"] = None,
    plane_moments: Optional["torch.Tensor"] = None,
) -> Tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """Loss (N,) in x's dtype and, when ``need_grad``, d(sum_n s[n] loss[n])/dx (x's shape
    and dtype, C-contiguous), else None, with s = ``grad_scale`` ((N,), folded into the
    fused pass where the kernels can) or 1. x, y (N, C, H, W) float tensors of one dtype
    and device, mask bool/uint8 of x's shape or None; ``plane_moments`` the outlier mask's
    (N*C, 3) float64 moments of where(mask, y, 0), or None (docs/spec.md, "Feature distance")."""
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    if mask is not None:
        mask = mask.detach().contiguous()
    if plane_moments is not None:
        plane_moments = plane_moments.detach().contiguous()
    if grad_scale is not None and not need_grad:
        grad_scale = None
    if not use_native_kernels(x.device):
        loss, grad = _torch_backend.feature_distance(x, y, mask, norm, distance, weight, need_grad, plane_moments)
        return loss.to(x.dtype), _rescale(grad, grad_scale)
    loss = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    grad = torch.empty_like(x) if need_grad else None
    n, c = x.shape[0], x.shape[1]
    device_args = _device_args(
        x, lambda: torch.empty(_C.feature_distance_workspace(n, c), dtype=torch.float64, device=x.device))
    folded = grad_scale
    if folded is not None:
        folded = grad_scale.detach().to(device=x.device, dtype=torch.float64).contiguous()
        if device_args and _cuda_kernel_set() == "v1":
            folded = None  # the 0.2 kernels cannot fold it: a second pass below
    if device_args and x.numel() == 0:
        loss.zero_()  # nothing to launch on the device: every plane is empty
        if grad is not None:
            grad.zero_()
    else:
        extra = {} if folded is None else {"grad_scale": as_c_arg(folded)}
        if plane_moments is not None:
            extra["plane_moments"] = as_c_arg(plane_moments)  # (the 0.2 kernels ignore them)
        _C.feature_distance(as_c_arg(x), as_c_arg(y), as_c_arg(mask), as_c_arg(loss), as_c_arg(grad),
                            norm, distance, weight, *device_args, **extra)
    if grad_scale is not None and folded is None:
        grad = _rescale(grad, grad_scale)
    return loss.to(x.dtype), grad


def _cuda_kernel_set() -> str:
    from . import _cuda

    return _cuda.kernel_set()


def _rescale(grad: Optional["torch.Tensor"], grad_scale: Optional["torch.Tensor"]) -> Optional["torch.Tensor"]:
    """grad[n] * grad_scale[n] in place (the path where the scale is not folded)."""
    if grad is None or grad_scale is None:
        return grad
    return grad.mul_(grad_scale.to(device=grad.device, dtype=grad.dtype).view(-1, *([1] * (grad.dim() - 1))))


def scale_gradient(grad: "torch.Tensor", factor: "torch.Tensor") -> "torch.Tensor":
    """grad * factor for a 0-dim ``factor`` on grad's device, in place, and without
    touching grad when factor == 1 (decided on the device by the kernels: no host sync);
    grad is C-contiguous (the fused kernel's output)."""
    if not use_native_kernels(grad.device) or grad.dim() != 4 or not grad.is_contiguous():
        return grad.mul_(factor.to(grad.dtype))
    f = factor.detach().to(device=grad.device, dtype=torch.float64).reshape(1)
    _C.scale_gradient(as_c_arg(grad), as_c_arg(f), *_device_args(grad, None))
    return grad


def feature_distance_numpy(
    x: np.ndarray, y: np.ndarray, mask: Optional[np.ndarray], norm: str, distance: str, weight: float,
    plane_moments: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The C kernel on numpy arrays (no gradient): loss (N,) in x's dtype."""
    x, y = native_contiguous(x), native_contiguous(y)
    if mask is not None:
        mask = native_contiguous(mask)
    extra = {} if plane_moments is None else {"plane_moments": native_contiguous(plane_moments)}
    loss = np.empty(x.shape[0], dtype=np.float64)
    _C.feature_distance(x, y, mask, loss, None, norm, distance, weight, **extra)
    return loss.astype(x.dtype)


# ---------------------------------------------------------------------- outlier mask


def outlier_mask(
    y: "torch.Tensor", quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
    return_plane_moments: bool = False,
) -> Tuple["torch.Tensor", Optional["torch.Tensor"], Optional["torch.Tensor"]]:
    """(keep bool of y's shape, stats (3,) = mean, std, outlier ratio, or None, plane
    moments (N*C, 3) = mean, M2, kept of where(keep, y, 0) per plane, or None) for a 4-D
    float tensor y. stats are float64, float32 from the plain-PyTorch backend on a device
    without float64 (which refuses the plane moments: they are float64)."""
    y = y.detach().contiguous()
    if not use_native_kernels(y.device):
        return _torch_backend.outlier_mask(y, quantile, margin_std, closing, opening, return_stats,
                                           return_plane_moments)
    keep = torch.empty(y.shape, dtype=torch.bool, device=y.device)
    stats = torch.empty(3, dtype=torch.float64, device=y.device) if return_stats else None
    device_args = _device_args(
        y, lambda: torch.empty(_C.outlier_mask_workspace_bytes(*y.shape), dtype=torch.uint8, device=y.device))
    moments = None
    kernel_moments = return_plane_moments and plane_moments_pay_off(y.device)  # (v1 CUDA kernels: none)
    if kernel_moments:
        moments = torch.empty((y.shape[0] * y.shape[1], 3), dtype=torch.float64, device=y.device)
        if y.shape[2] * y.shape[3] == 0:
            moments.zero_()  # planes of no value: nothing is launched on a device to write them
    _C.outlier_mask(as_c_arg(y), as_c_arg(keep), as_c_arg(stats), quantile, margin_std, closing, opening,
                    *device_args, **({"plane_moments": as_c_arg(moments)} if kernel_moments else {}))
    if return_plane_moments and moments is None:
        # the 0.2 kernels write none: the same quantities, in torch's order of the sums
        moments = _torch_backend.plane_moments(y, keep)
    return keep, stats, moments


def plane_moments_pay_off(device: Any) -> bool:
    """Whether asking the outlier mask for its plane moments, to hand them to the feature
    distance, saves that op its pass over y and the mask: with lpl_ext's kernels on the CPU
    and on CUDA's current kernels (the 0.2 kernels and the plain-PyTorch backend compute
    their own statistics)."""
    if not use_native_kernels(device):
        return False
    return torch.device(device).type != "cuda" or _cuda_kernel_set() != "v1"


def outlier_mask_numpy(
    y: np.ndarray, quantile: float, margin_std: float, closing: int, opening: int,
    return_plane_moments: bool = False,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The C kernel on a numpy array: (keep bool of y's shape, stats (3,) float64, plane
    moments (N*C, 3) float64 or None)."""
    y = native_contiguous(y)
    keep = np.empty(y.shape, dtype=np.bool_)
    stats = np.empty(3, dtype=np.float64)
    moments = np.empty((y.shape[0] * y.shape[1], 3), dtype=np.float64) if return_plane_moments else None
    _C.outlier_mask(y, keep, stats, quantile, margin_std, closing, opening,
                    **({} if moments is None else {"plane_moments": moments}))
    return keep, stats, moments
