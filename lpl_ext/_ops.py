"""The lpl_ext kernels declared to PyTorch as operators (``torch.ops.lpl_ext.*``).

Declared once here with ``torch.library.custom_op`` (torch >= 2.4), each with a fake
implementation (output shapes and dtypes without running the kernel) so that
``torch.compile`` / AOTAutograd trace through the call without a graph break, and the
feature distance with an autograd registration:

``lpl_ext::feature_distance(x, y, mask, norm, distance, weight, need_grad, reentrant)
-> (loss, grad)``
    loss (N,) in x's dtype; grad, d(sum loss)/dx in x's shape and dtype, computed by the
    same fused pass when ``need_grad`` (an empty (0,) tensor otherwise). Backward only
    rescales the saved grad by the incoming (N,) gradient, in place unless
    ``reentrant`` (docs/spec.md, "Feature distance").

``lpl_ext::outlier_mask(y, quantile, margin_std, closing, opening, return_stats)
-> (keep, stats)``
    keep: bool (N, C, H, W); stats: float64 (3,) = mean, std, outlier ratio when
    ``return_stats``, else (0,) (float32 on a device without float64, e.g. MPS). Not
    differentiable (a mask of a constant).

Both run the C/CUDA kernels on CPU and CUDA tensors and lpl_ext's plain-PyTorch
backend (``lpl_ext._torch_backend``) on other devices or with ``LPL_EXT_BACKEND=torch``
(the choice is made inside the eager implementation, so a compiled graph holds the
operator either way).

The operators take torch tensors only and trust the options they are given: the public
``lpl_ext.feature_distance`` / ``lpl_ext.outlier_mask`` validate them in Python first
(outside any traced graph) and keep their direct path for numpy arrays. On older torch
``HAS_CUSTOM_OPS`` is False and those functions fall back to the autograd.Function path.

The eager implementations import the launchers lazily: those modules import this one.
"""

# No ``from __future__ import annotations``: torch.library.custom_op reads the schema from
# the annotations, and torch 2.4 cannot parse string annotations.
from typing import Any, Optional, Tuple

from ._backend import torch

HAS_CUSTOM_OPS = bool(
    torch is not None
    and hasattr(torch, "library")
    and all(hasattr(torch.library, a) for a in ("custom_op", "register_fake", "register_autograd"))
)

if HAS_CUSTOM_OPS:
    Tensor = torch.Tensor

    @torch.library.custom_op("lpl_ext::feature_distance", mutates_args=())
    def _feature_distance_op(
        x: Tensor, y: Tensor, mask: Optional[Tensor], norm: str, distance: str, weight: float,
        need_grad: bool, reentrant: bool,
    ) -> Tuple[Tensor, Tensor]:
        from .feature_distance import _forward_torch

        loss, grad = _forward_torch(x, y, mask, norm, distance, weight, need_grad=need_grad)
        if grad is None:
            grad = x.new_empty((0,))
        return loss, grad

    @_feature_distance_op.register_fake
    def _feature_distance_fake(
        x: Tensor, y: Tensor, mask: Optional[Tensor], norm: str, distance: str, weight: float,
        need_grad: bool, reentrant: bool,
    ) -> Tuple[Tensor, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        if tuple(y.shape) != tuple(x.shape):
            raise ValueError(f"y: shape {tuple(y.shape)} differs from x {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(x.shape):
            raise ValueError(f"mask: shape {tuple(mask.shape)} differs from x {tuple(x.shape)}")
        loss = x.new_empty((x.shape[0],))
        # The kernel writes a C-contiguous gradient whatever x's memory format.
        grad = x.new_empty(tuple(x.shape)) if need_grad else x.new_empty((0,))
        return loss, grad

    def _feature_distance_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad)
        ctx.need_grad = bool(inputs[6])
        ctx.reentrant = bool(inputs[7])

    def _feature_distance_backward(ctx: Any, grad_loss: Tensor, _grad_of_grad: Any) -> Tuple[Any, ...]:
        from .feature_distance import _scale_kept_gradient

        nones = (None,) * 7
        (grad,) = ctx.saved_tensors
        if not ctx.need_grad or grad_loss is None:
            return (None,) + nones
        return (_scale_kept_gradient(grad, grad_loss, ctx.reentrant),) + nones

    _feature_distance_op.register_autograd(_feature_distance_backward, setup_context=_feature_distance_setup_context)

    @torch.library.custom_op("lpl_ext::outlier_mask", mutates_args=())
    def _outlier_mask_op(
        y: Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
    ) -> Tuple[Tensor, Tensor]:
        from ._torch_backend import wide_dtype
        from .outlier_mask import _outlier_mask_torch

        keep, stats = _outlier_mask_torch(y, quantile, margin_std, closing, opening, return_stats)
        if stats is None:
            stats = torch.empty((0,), dtype=wide_dtype(y.device), device=y.device)
        return keep, stats

    @_outlier_mask_op.register_fake
    def _outlier_mask_fake(
        y: Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
    ) -> Tuple[Tensor, Tensor]:
        if y.dim() != 4:
            raise ValueError(f"y: expected a 4-D (N, C, H, W) tensor, got shape {tuple(y.shape)}")
        from ._torch_backend import wide_dtype

        keep = y.new_empty(tuple(y.shape), dtype=torch.bool)
        # float64, or float32 on a device without float64 (the plain-PyTorch backend's)
        stats = y.new_empty((3,) if return_stats else (0,), dtype=wide_dtype(y.device, probe=False))
        return keep, stats

__all__ = ["HAS_CUSTOM_OPS"]
