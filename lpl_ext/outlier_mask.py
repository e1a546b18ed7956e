"""Outlier keep-mask of the target features (docs/spec.md, "Outlier mask").

Per (n, c) plane of y, over its finite values (count L_f):

1. q1 / q2 = the k1-th / k2-th smallest value, k1 = floor(L_f * quantile),
   k2 = floor(L_f * (1 - quantile)), 1-indexed and clamped into [1, L_f] (exact order
   statistics from a radix select, no sort);
2. m = margin_std * s, s = sample std (divisor L_f - 1; NaN for a single value, so a
   1-value plane keeps nothing; exactly 0 for a constant plane, so it keeps nothing);
3. keep = (q1 - m < y) & (y < q2 + m), strict; thresholds rounded as torch rounds them
   in y's dtype (float16 / bfloat16 / float32 arithmetic as the reference does it);
4. closing: max filter over a closing x closing window (max_pool2d, stride 1, padding
   (k - 1) // 2, outside ignored), then opening: min filter over opening x opening;
5. keep &= isfinite(y).

Non-finite policy: NaN and +-Inf are never kept, and are left out of the order
statistics and of the std, so they cannot poison the rest of the plane. A plane with no
finite value keeps nothing.

Layer statistics (for logging), computed by the same kernels without any host sync:
mean and unbiased std (divisor N*C*H*W - 1) of ``where(keep, y, 0)`` over the whole
layer, and the outlier ratio 1 - mean(keep). Masked values count as 0 (not y * keep, so
a NaN in y cannot make the statistics NaN).

Torch tensors go through the PyTorch operator ``torch.ops.lpl_ext.outlier_mask``
(declared in ``lpl_ext._ops``; traced by ``torch.compile`` without a graph break) where
torch has ``torch.library.custom_op`` (>= 2.4), and call the kernel directly otherwise.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import _C, _ops
from ._backend import as_c_arg, check_kind, cuda_kernels, stream_of, torch, use_native_kernels


class OutlierStats(NamedTuple):
    """Per-layer logging statistics: 0-d float64 tensors on y's device (float32 on a
    device without float64, e.g. MPS; numpy float64 scalars for numpy input)."""

    mean: Any
    std: Any
    outlier_ratio: Any


def outlier_windows(down_factor: int) -> Tuple[int, int]:
    """(closing, opening) window sizes of the reference for a down factor d >= 1:
    opening = ceil(5 / d), closing = ceil(3 / d); an opening of 2 becomes 3 and a
    closing of 2 becomes 1. d = 1 -> (3, 5), d = 2 -> (1, 3)."""
    if isinstance(down_factor, bool) or not isinstance(down_factor, (int, np.integer)):
        raise TypeError(f"down_factor: expected an int, got {type(down_factor).__name__}")
    if down_factor < 1:
        raise ValueError(f"down_factor: must be >= 1, got {down_factor}")
    opening = int(math.ceil(5 / int(down_factor)))
    closing = int(math.ceil(3 / int(down_factor)))
    if opening == 2:
        opening = 3
    if closing == 2:
        closing = 1
    return closing, opening


def _check_options(quantile: Any, margin_std: Any, closing: Any, opening: Any) -> Tuple[float, float, int, int]:
    for name, v in (("quantile", quantile), ("margin_std", margin_std)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    quantile, margin_std = float(quantile), float(margin_std)
    if not (0.0 < quantile < 0.5):
        raise ValueError(f"quantile: must be in the open interval (0, 0.5), got {quantile}")
    if not (math.isfinite(margin_std) and margin_std >= 0.0):
        raise ValueError(f"margin_std: must be a finite number >= 0, got {margin_std}")
    for name, v in (("closing", closing), ("opening", opening)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}: expected an odd positive int, got {type(v).__name__}")
        if v < 1 or v % 2 == 0:
            raise ValueError(f"{name}: window size must be odd and positive, got {v}")
        if v > 2**31 - 1:
            raise ValueError(f"{name}: window size too large, got {v}")
    return quantile, margin_std, int(closing), int(opening)


def _native_contiguous(a: np.ndarray) -> np.ndarray:
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    # a copy also realigns misaligned buffers (views into byte arrays)
    return np.require(a, requirements=["C", "A"])


def outlier_mask(
    y: Any,
    *,
    quantile: float = 0.02,
    margin_std: float = 2.0,
    closing: int = 3,
    opening: int = 5,
    return_stats: bool = False,
) -> Union[Any, Tuple[Any, OutlierStats]]:
    """Keep-mask of the target features y.

    Args:
        y: (N, C, H, W) float32 / float64 / float16 / bfloat16; a torch tensor (CPU and
            CUDA run the kernels, other devices the plain-PyTorch backend, see
            ``LPL_EXT_BACKEND`` in docs/switching.md) or a numpy array (float32 / float64 /
            float16; the C kernel). Never differentiated.
        quantile: q in (0, 0.5): the order statistics are the floor(L*q)-th and
            floor(L*(1-q))-th smallest finite values of each plane.
        margin_std: margin in sample standard deviations (>= 0).
        closing: odd window of the max filter (1 = none); see ``outlier_windows``.
        opening: odd window of the min filter (1 = none).
        return_stats: also return the layer's ``OutlierStats``.

    Returns:
        bool keep-mask of y's shape on y's device (a torch tensor or a numpy array like
        y); with ``return_stats``, ``(mask, OutlierStats(mean, std, outlier_ratio))``.
    """
    quantile, margin_std, closing, opening = _check_options(quantile, margin_std, closing, opening)
    check_kind("y", y)
    if isinstance(y, np.ndarray):
        if y.ndim != 4:
            raise ValueError(f"y: expected a 4-D (N, C, H, W) array, got shape {y.shape}")
        y = _native_contiguous(y)
        keep = np.empty(y.shape, dtype=np.bool_)
        stats = np.empty(3, dtype=np.float64)
        _C.outlier_mask(y, keep, stats, quantile, margin_std, closing, opening, 0, None)
        if return_stats:
            return keep, OutlierStats(stats[0], stats[1], stats[2])
        return keep
    if y.dim() != 4:
        raise ValueError(f"y: expected a 4-D (N, C, H, W) tensor, got shape {tuple(y.shape)}")
    if _ops.HAS_CUSTOM_OPS:
        keep, stats = torch.ops.lpl_ext.outlier_mask(y.detach(), quantile, margin_std, closing, opening,
                                                     bool(return_stats))
    else:
        keep, stats = _outlier_mask_torch(y, quantile, margin_std, closing, opening, bool(return_stats))
    if return_stats:
        return keep, OutlierStats(stats[0], stats[1], stats[2])
    return keep


def _launch_outlier_mask(
    y: "torch.Tensor", keep: "torch.Tensor", stats: Optional["torch.Tensor"], quantile: float,
    margin_std: float, closing: int, opening: int,
) -> None:
    """The raw kernel call: writes keep (y's shape, bool) and, when given, stats (3,)
    float64. All tensors contiguous on y's device."""
    cuda_args: tuple = ()
    if y.is_cuda:
        n, c, h, w = y.shape
        workspace = torch.empty(_C.outlier_mask_workspace_bytes(n, c, h, w), dtype=torch.uint8, device=y.device)
        cuda_args = (stream_of(y), as_c_arg(workspace), cuda_kernels(y.device))
    _C.outlier_mask(as_c_arg(y), as_c_arg(keep), as_c_arg(stats), quantile, margin_std, closing, opening,
                    *cuda_args)


def _outlier_mask_torch(
    y: "torch.Tensor", quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """(keep bool of y's shape, stats (3,) float64 or None) for a 4-D torch tensor y: the
    C/CUDA kernel, or the plain-PyTorch backend where ``_backend.use_native_kernels`` says
    so (its stats are float32 on devices without float64)."""
    y = y.detach().contiguous()
    if not use_native_kernels(y.device):
        from . import _torch_backend

        return _torch_backend.outlier_mask(y, quantile, margin_std, closing, opening, return_stats)
    keep = torch.empty(y.shape, dtype=torch.bool, device=y.device)
    stats = torch.empty(3, dtype=torch.float64, device=y.device) if return_stats else None
    _launch_outlier_mask(y, keep, stats, quantile, margin_std, closing, opening)
    return keep, stats


__all__ = ["OutlierStats", "outlier_mask", "outlier_windows"]
