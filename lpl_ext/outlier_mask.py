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
(declared in ``lpl_ext._ops``; traced by ``torch.compile`` without a graph break); numpy
arrays call the kernel directly (``lpl_ext._launch``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Tuple, Union

import numpy as np

from . import _launch
from ._backend import torch
from ._options import check_kind, check_outlier_mask_args, check_outlier_mask_options

if torch is not None:
    from . import _ops  # noqa: F401 (declares torch.ops.lpl_ext.*)


class OutlierStats(NamedTuple):
    """Per-layer logging statistics: 0-d float64 tensors on y's device (float32 on a
    device without float64, e.g. MPS; numpy float64 scalars for numpy input)."""

    mean: Any
    std: Any
    outlier_ratio: Any


def reference_windows(down_factor: float, closing: float = 3, opening: float = 5) -> Tuple[int, int]:
    """The reference's window rule, the one place it is written: (closing, opening) =
    (ceil(closing / d), ceil(opening / d)), then an opening of 2 becomes 3 and a closing of
    2 becomes 1. Positive numbers, checked by the callers."""
    closing_size = int(math.ceil(closing / down_factor))
    opening_size = int(math.ceil(opening / down_factor))
    if opening_size == 2:
        opening_size = 3
    if closing_size == 2:
        closing_size = 1
    return closing_size, opening_size


def outlier_windows(down_factor: int) -> Tuple[int, int]:
    """(closing, opening) window sizes of the reference for a down factor d >= 1:
    opening = ceil(5 / d), closing = ceil(3 / d); an opening of 2 becomes 3 and a
    closing of 2 becomes 1. d = 1 -> (3, 5), d = 2 -> (1, 3)."""
    if isinstance(down_factor, bool) or not isinstance(down_factor, (int, np.integer)):
        raise TypeError(f"down_factor: expected an int, got {type(down_factor).__name__}")
    if down_factor < 1:
        raise ValueError(f"down_factor: must be >= 1, got {down_factor}")
    return reference_windows(int(down_factor))


def outlier_mask(
    y: Any,
    *,
    quantile: float = 0.02,
    margin_std: float = 2.0,
    closing: int = 3,
    opening: int = 5,
    return_stats: bool = False,
    return_plane_moments: bool = False,
) -> Union[Any, Tuple[Any, OutlierStats], Tuple[Any, Any], Tuple[Any, OutlierStats, Any]]:
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
        return_plane_moments: also return the (N*C, 3) float64 per-plane moments of
            ``where(mask, y, 0)``: row n*C + c = [mean over the plane's H*W values, M2 (sum
            of squared deviations from it), kept count], which ``feature_distance(...,
            plane_moments=)`` takes with this mask so that it needs no pass of its own over
            y for them. CPU and CUDA (current kernels) give the same bits; the 0.2 CUDA
            kernels (``LPL_EXT_KERNEL_SET=v1``) and the plain-PyTorch backend the same
            values up to the order of the sums; a device without float64 cannot hold them.

    Returns:
        bool keep-mask of y's shape on y's device (a torch tensor or a numpy array like
        y); with ``return_stats``, ``(mask, OutlierStats(mean, std, outlier_ratio))``; with
        ``return_plane_moments`` the moments last: ``(mask, moments)`` or ``(mask, stats,
        moments)``.
    """
    quantile, margin_std, closing, opening = check_outlier_mask_options(quantile, margin_std, closing, opening)
    check_kind("y", y)
    check_outlier_mask_args(y)
    moments = None
    if isinstance(y, np.ndarray):
        keep, stats, moments = _launch.outlier_mask_numpy(y, quantile, margin_std, closing, opening,
                                                          bool(return_plane_moments))
    elif return_plane_moments:
        keep, stats, moments = torch.ops.lpl_ext.outlier_mask_moments(y.detach(), quantile, margin_std, closing,
                                                                      opening, bool(return_stats))
    else:
        keep, stats = torch.ops.lpl_ext.outlier_mask(y.detach(), quantile, margin_std, closing, opening,
                                                     bool(return_stats))
    out = (keep,)
    if return_stats:
        out += (OutlierStats(stats[0], stats[1], stats[2]),)
    if return_plane_moments:
        out += (moments,)
    return out if len(out) > 1 else keep


__all__ = ["OutlierStats", "outlier_mask", "outlier_windows", "reference_windows"]
