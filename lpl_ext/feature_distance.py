"""Fused LPL feature distance for one decoder layer (docs/spec.md, "Normalization" and "Feature distance").

The C/CUDA kernel computes the per-sample loss and, in the same pass, its gradient with
respect to the prediction features ``x``; backward only rescales that gradient by the
incoming (N,) gradient. ``y`` (target features) and ``mask`` are constants.

Torch tensors go through the PyTorch operator ``torch.ops.lpl_ext.feature_distance``
(declared in ``lpl_ext._ops``), so ``torch.compile(fullgraph=True)`` traces the call
without a graph break; numpy arrays call the kernel directly (``lpl_ext._launch``).
"""

from __future__ import annotations

import warnings
from typing import Any, Tuple

import numpy as np

from . import _launch
from ._backend import torch
from ._options import (DISTANCES, NORMS, check_feature_distance_args, check_feature_distance_options, check_kind,
                       check_plane_moments)

if torch is not None:
    from . import _ops  # noqa: F401 (declares torch.ops.lpl_ext.*)


def feature_distance(
    x: Any,
    y: Any,
    mask: Any = None,
    *,
    norm: str = "shared",
    distance: str = "mse",
    weight: float = 1.0,
    reentrant: bool = False,
    plane_moments: Any = None,
) -> Any:
    """Per-sample LPL distance of one layer.

    Args:
        x: prediction features (N, C, H, W), float32/float64/float16/bfloat16; a torch
            tensor (differentiable; CPU and CUDA run the kernels, other devices the
            plain-PyTorch backend, see ``LPL_EXT_BACKEND`` in docs/switching.md) or a
            numpy array (the C kernel; no autograd).
        y: target features, same shape, dtype and device as x; treated as a constant.
        mask: optional keep-mask (bool or uint8) of x's shape; y counts as y * mask and
            each (n, c) plane is averaged over its kept pixels (an empty plane adds 0).
        norm: "default" (each side by its own channel norm), "shared" (both by the
            target's channel norm), "batch" (per-channel mean/std of the target) or "none".
        distance: "mse" or "l1".
        weight: layer weight w (e.g. 2**-min(i, 3) with pow_law); a Python number.
        reentrant: allow more than one backward through the same graph (retain_graph,
            gradcheck); by default backward rescales the kept gradient in place, which
            saves an x-sized allocation per layer.
        plane_moments: optional, only with ``mask``: the (N*C, 3) float64 moments
            ``outlier_mask(y, return_plane_moments=True)`` returned with that mask (of that
            y). The kept counts and the ``batch`` statistics are then taken from them
            instead of a pass over the mask and y (docs/spec.md, "Feature distance"); they
            are trusted to belong to this mask and y.

    Returns:
        (N,) loss in x's dtype (a tensor or an array like x). Accumulation is fp32 for
        16-bit inputs and fp64 for float64.
    """
    weight = check_feature_distance_options(norm, distance, weight)
    check_kind("x", x)
    check_feature_distance_args(x, y, mask)
    check_plane_moments(plane_moments, x, mask)
    if isinstance(x, np.ndarray):
        return _launch.feature_distance_numpy(x, y, mask, norm, distance, weight, plane_moments)
    need_grad = bool(x.requires_grad and torch.is_grad_enabled())
    # y, mask and the moments are constants: detached, so autograd never asks for their gradient.
    loss, _ = torch.ops.lpl_ext.feature_distance(x, y.detach(), None if mask is None else mask.detach(), norm,
                                                 distance, weight, need_grad, bool(reentrant),
                                                 None if plane_moments is None else plane_moments.detach())
    return loss


def weighted_feature_distance(
    x: Any,
    y: Any,
    mask: Any = None,
    *,
    sample_weight: Any,
    norm: str = "shared",
    distance: str = "mse",
    weight: float = 1.0,
    reentrant: bool = False,
    plane_moments: Any = None,
) -> Tuple[Any, Any]:
    """``(sum_n sample_weight[n] * loss[n], loss)`` of one layer, with the weights folded
    into the fused pass's gradient.

    The same loss as :func:`feature_distance`, for a caller that reduces the per-sample
    losses with weights known at forward time (the objective: SNR weights / batch size).
    Its backward then multiplies the kept gradient only by the scalar upstream gradient,
    and skips even that when it is exactly 1 (e.g. a bf16 step without gradient
    accumulation), instead of a rescaling pass over an x-sized tensor per layer.

    Args:
        x, y, mask, norm, distance, weight, reentrant, plane_moments: as
            :func:`feature_distance` (torch tensors only).
        sample_weight: (N,) floating tensor on x's device; a constant (not differentiated).

    Returns:
        total: 0-dim, differentiable (float64 for float64 x, else float32);
        loss: (N,) in x's dtype, detached (for logging).
    """
    weight = check_feature_distance_options(norm, distance, weight)
    check_kind("x", x)
    if isinstance(x, np.ndarray):
        raise TypeError("x: weighted_feature_distance takes torch tensors (numpy arrays have no autograd)")
    check_feature_distance_args(x, y, mask)
    if not isinstance(sample_weight, torch.Tensor):
        raise TypeError(f"sample_weight: expected a torch.Tensor, got {type(sample_weight).__name__}")
    if sample_weight.shape != (x.shape[0],) or not sample_weight.is_floating_point():
        raise ValueError(f"sample_weight: expected a floating ({x.shape[0]},) tensor, got "
                         f"{sample_weight.dtype} {tuple(sample_weight.shape)}")
    if sample_weight.device != x.device:
        raise ValueError(f"sample_weight: on {sample_weight.device}, x on {x.device}")
    check_plane_moments(plane_moments, x, mask)
    need_grad = bool(x.requires_grad and torch.is_grad_enabled())
    total, loss, _ = torch.ops.lpl_ext.weighted_feature_distance(
        x, y.detach(), None if mask is None else mask.detach(), norm, distance, weight, sample_weight.detach(),
        need_grad, bool(reentrant), None if plane_moments is None else plane_moments.detach())
    return total, loss


class FeatureDistanceFunction:
    """Deprecated: the ``torch.autograd.Function`` of torch < 2.4, which lpl_ext no longer
    supports. ``FeatureDistanceFunction.apply(x, y, mask, norm, distance, weight,
    reentrant=False)`` is :func:`feature_distance` (the operator and its autograd), with a
    DeprecationWarning."""

    @staticmethod
    def apply(x: Any, y: Any, mask: Any, norm: str, distance: str, weight: float, reentrant: bool = False) -> Any:
        warnings.warn("lpl_ext.FeatureDistanceFunction is deprecated: call lpl_ext.feature_distance(x, y, mask, "
                      "norm=..., distance=..., weight=..., reentrant=...), the same operator and autograd",
                      DeprecationWarning, stacklevel=2)
        return feature_distance(x, y, mask, norm=norm, distance=distance, weight=weight, reentrant=reentrant)


__all__ = ["DISTANCES", "FeatureDistanceFunction", "NORMS", "feature_distance", "weighted_feature_distance"]
