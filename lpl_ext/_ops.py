"""The lpl_ext kernels declared to PyTorch as operators (``torch.ops.lpl_ext.*``).

Declared once here with ``torch.library.custom_op`` (torch >= 2.4, the floor lpl_ext
requires), each with a fake implementation (output shapes and dtypes without running the
kernel) so that ``torch.compile`` / AOTAutograd trace through the call without a graph
break, and the feature distance with an autograd registration:

``lpl_ext::feature_distance(x, y, mask, norm, distance, weight, need_grad, reentrant,
plane_moments=None) -> (loss, grad)``
    loss (N,) in x's dtype; grad, d(sum loss)/dx in x's shape and dtype, computed by the
    same fused pass when ``need_grad`` (an empty (0,) tensor otherwise). Backward only
    rescales the saved grad by the incoming (N,) gradient, in place unless
    ``reentrant`` (docs/spec.md, "Feature distance"). ``plane_moments``: the outlier
    mask's (N*C, 3) float64 moments of where(mask, y, 0), with the mask they came with (a
    constant, like y and the mask).

``lpl_ext::weighted_feature_distance(x, y, mask, norm, distance, weight, sample_weight,
need_grad, reentrant, plane_moments=None) -> (total, loss, grad)``
    total = sum_n sample_weight[n] loss[n] (0-dim; float64 for float64 x, else float32)
    and the per-sample loss (N,) in x's dtype (not differentiable); grad as above. The fused pass folds
    sample_weight into the gradient, so backward only multiplies by the scalar upstream
    gradient, and does not touch the gradient at all when that is 1 (decided on the
    device: no host sync). The objective's own use (docs/spec.md, "Feature distance").

``lpl_ext::outlier_mask(y, quantile, margin_std, closing, opening, return_stats)
-> (keep, stats)``
    keep: bool (N, C, H, W); stats: float64 (3,) = mean, std, outlier ratio when
    ``return_stats``, else (0,) (float32 on a device without float64, e.g. MPS). Not
    differentiable (a mask of a constant).

``lpl_ext::outlier_mask_moments(y, quantile, margin_std, closing, opening, return_stats)
-> (keep, stats, plane_moments)``
    The same, and the (N*C, 3) float64 per-plane moments of where(keep, y, 0) (mean, M2,
    kept count; csrc/lpl_kernel_abi.h), which the feature distance takes with that keep.

One layer of the one-way stack (``lpl_ext._launch`` describes it): the eager
implementations call ``lpl_ext._launch``, which picks the kernels or the plain-PyTorch
backend at run time (so a compiled graph holds the operator either way). The operators
take torch tensors and trust their options: the public ``lpl_ext.feature_distance`` /
``lpl_ext.outlier_mask`` validate them first, outside any traced graph.
"""

# No ``from __future__ import annotations``: torch.library.custom_op reads the schema from
# the annotations, and torch 2.4 cannot parse string annotations.
import inspect
from typing import Any, Optional, Tuple

from . import _launch, _options
from ._backend import torch
from ._torch_backend import wide_dtype

Tensor = torch.Tensor


# ---------------------------------------------------------------------- feature distance


def _feature_distance(
    x: Tensor, y: Tensor, mask: Optional[Tensor], norm: str, distance: str, weight: float,
    need_grad: bool, reentrant: bool, plane_moments: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    loss, grad = _launch.feature_distance(x, y, mask, norm, distance, weight, need_grad,
                                          plane_moments=plane_moments)
    return loss, x.new_empty((0,)) if grad is None else grad


#: The operator's arguments in schema order (custom_op reads the schema from this
#: signature): autograd's ``inputs`` and the gradients backward returns are matched to
#: them by name, not by position.
FEATURE_DISTANCE_ARGS: Tuple[str, ...] = tuple(inspect.signature(_feature_distance).parameters)
feature_distance = torch.library.custom_op("lpl_ext::feature_distance", mutates_args=())(_feature_distance)


@feature_distance.register_fake
def _feature_distance_fake(
    x: Tensor, y: Tensor, mask: Optional[Tensor], norm: str, distance: str, weight: float,
    need_grad: bool, reentrant: bool, plane_moments: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    _options.check_feature_distance_args(x, y, mask)
    _options.check_plane_moments(plane_moments, x, mask)
    loss = x.new_empty((x.shape[0],))
    # The kernel writes a C-contiguous gradient whatever x's memory format.
    grad = x.new_empty(tuple(x.shape)) if need_grad else x.new_empty((0,))
    return loss, grad


def _feature_distance_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    args = dict(zip(FEATURE_DISTANCE_ARGS, inputs))
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.need_grad = bool(args["need_grad"])
    ctx.reentrant = bool(args["reentrant"])


def _feature_distance_backward(ctx: Any, grad_loss: Tensor, _grad_of_grad: Any) -> Tuple[Any, ...]:
    (grad,) = ctx.saved_tensors
    grads = dict.fromkeys(FEATURE_DISTANCE_ARGS)  # y, mask, plane_moments: constants; the rest options
    if ctx.need_grad and grad_loss is not None:
        grads["x"] = scale_kept_gradient(grad, grad_loss, ctx.reentrant)
    return tuple(grads.values())


def scale_kept_gradient(grad: Tensor, grad_loss: Tensor, reentrant: bool) -> Tensor:
    """d(sum_n g_n loss_n)/dx from the kept d(sum loss)/dx: grad[n] * grad_loss[n].

    In place unless ``reentrant`` (the kept buffer is then spent: a second backward
    through the same graph trips autograd's version check). By default no second x-sized
    allocation (on CPU its page faults cost as much as the kernel)."""
    # Tensors being traced (torch.compile / AOTAutograd hand in tensor subclasses) take
    # the plain out-of-place product: the shortcut below is a data-dependent branch, and
    # the compiler functionalizes an in-place product anyway (it may re-inplace it).
    traced = type(grad) is not torch.Tensor or type(grad_loss) is not torch.Tensor
    if not traced and grad.device.type == "cpu" and bool((grad_loss == 1).all()):
        # d(loss.sum())/dx is the kept gradient itself: no pass at all. The check costs a
        # host sync, so every other device always rescales.
        return grad
    scale = grad_loss.to(grad.dtype).view(-1, 1, 1, 1)
    if reentrant or traced:
        return grad * scale
    return grad.mul_(scale)


feature_distance.register_autograd(_feature_distance_backward, setup_context=_feature_distance_setup_context)


# ---------------------------------------------------------------------- weighted feature distance


def total_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of weighted_feature_distance's total for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weighted_feature_distance(
    x: Tensor, y: Tensor, mask: Optional[Tensor], norm: str, distance: str, weight: float, sample_weight: Tensor,
    need_grad: bool, reentrant: bool, plane_moments: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    loss, grad = _launch.feature_distance(x, y, mask, norm, distance, weight, need_grad, grad_scale=sample_weight,
                                          plane_moments=plane_moments)
    total = (loss.to(torch.float64) * sample_weight.to(torch.float64)).sum().to(total_dtype(x.dtype))
    return total, loss, x.new_empty((0,)) if grad is None else grad


WEIGHTED_FEATURE_DISTANCE_ARGS: Tuple[str, ...] = tuple(inspect.signature(_weighted_feature_distance).parameters)
weighted_feature_distance = torch.library.custom_op("lpl_ext::weighted_feature_distance",
                                                    mutates_args=())(_weighted_feature_distance)


@weighted_feature_distance.register_fake
def _weighted_feature_distance_fake(
    x: Tensor, y: Tensor, mask: Optional[Tensor], norm: str, distance: str, weight: float, sample_weight: Tensor,
    need_grad: bool, reentrant: bool, plane_moments: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    _options.check_feature_distance_args(x, y, mask)
    _options.check_plane_moments(plane_moments, x, mask)
    total = x.new_empty((), dtype=total_dtype(x.dtype))
    loss = x.new_empty((x.shape[0],))
    grad = x.new_empty(tuple(x.shape)) if need_grad else x.new_empty((0,))
    return total, loss, grad


def _weighted_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
    args = dict(zip(WEIGHTED_FEATURE_DISTANCE_ARGS, inputs))
    _, loss, grad = output
    ctx.mark_non_differentiable(loss, grad)
    ctx.save_for_backward(grad)
    ctx.need_grad = bool(args["need_grad"])
    ctx.reentrant = bool(args["reentrant"])


def _weighted_backward(ctx: Any, grad_total: Tensor, _grad_loss: Any, _grad_of_grad: Any) -> Tuple[Any, ...]:
    (grad,) = ctx.saved_tensors
    grads = dict.fromkeys(WEIGHTED_FEATURE_DISTANCE_ARGS)  # y, mask, sample_weight, plane_moments: constants
    if ctx.need_grad and grad_total is not None:
        traced = type(grad) is not torch.Tensor or type(grad_total) is not torch.Tensor
        if ctx.reentrant or traced:
            grads["x"] = grad * grad_total.to(grad.dtype)
        else:
            # in place, and no pass at all when grad_total == 1 (the kept buffer is spent)
            grads["x"] = _launch.scale_gradient(grad, grad_total)
    return tuple(grads.values())


weighted_feature_distance.register_autograd(_weighted_backward, setup_context=_weighted_setup_context)


# ---------------------------------------------------------------------- outlier mask


@torch.library.custom_op("lpl_ext::outlier_mask", mutates_args=())
def outlier_mask(
    y: Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple[Tensor, Tensor]:
    keep, stats, _ = _launch.outlier_mask(y, quantile, margin_std, closing, opening, return_stats)
    if stats is None:
        stats = torch.empty((0,), dtype=wide_dtype(y.device), device=y.device)
    return keep, stats


def _outlier_mask_outputs(y: Tensor, return_stats: bool) -> Tuple[Tensor, Tensor]:
    """The fakes' keep and stats."""
    _options.check_outlier_mask_args(y)
    keep = y.new_empty(tuple(y.shape), dtype=torch.bool)
    # float64, or float32 on a device without float64 (the plain-PyTorch backend's)
    stats = y.new_empty((3,) if return_stats else (0,), dtype=wide_dtype(y.device, probe=False))
    return keep, stats


@outlier_mask.register_fake
def _outlier_mask_fake(
    y: Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple[Tensor, Tensor]:
    return _outlier_mask_outputs(y, return_stats)


@torch.library.custom_op("lpl_ext::outlier_mask_moments", mutates_args=())
def outlier_mask_moments(
    y: Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    keep, stats, moments = _launch.outlier_mask(y, quantile, margin_std, closing, opening, return_stats, True)
    if stats is None:
        stats = torch.empty((0,), dtype=wide_dtype(y.device), device=y.device)
    return keep, stats, moments


@outlier_mask_moments.register_fake
def _outlier_mask_moments_fake(
    y: Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    keep, stats = _outlier_mask_outputs(y, return_stats)
    return keep, stats, y.new_empty((y.shape[0] * y.shape[1], 3), dtype=torch.float64)


__all__ = ["FEATURE_DISTANCE_ARGS", "WEIGHTED_FEATURE_DISTANCE_ARGS", "feature_distance", "outlier_mask",
           "outlier_mask_moments", "scale_kept_gradient", "total_dtype", "weighted_feature_distance"]
