"""Fused LPL feature distance for one decoder layer (docs/spec.md, "Normalization" and "Feature distance").

The C/CUDA kernel computes the per-sample loss and, in the same pass, its gradient with
respect to the prediction features ``x``; backward only rescales that gradient by the
incoming (N,) gradient. ``y`` (target features) and ``mask`` are constants.

Torch tensors go through the PyTorch operator ``torch.ops.lpl_ext.feature_distance``
(declared in ``lpl_ext._ops``), so ``torch.compile(fullgraph=True)`` traces the call
without a graph break; on torch versions without ``torch.library.custom_op`` (< 2.4)
the :class:`FeatureDistanceFunction` autograd path is used instead. numpy arrays call
the kernel directly.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from . import _C, _ops
from ._backend import as_c_arg, check_kind, cuda_kernels, is_tensor, stream_of, torch, use_native_kernels

NORMS = ("default", "shared", "batch", "none")
DISTANCES = ("mse", "l1")


def _check_options(norm: Any, distance: Any, weight: Any) -> float:
    """Validate the options on the Python side (plain Python values: under torch.compile
    these checks are evaluated at trace time and leave nothing in the graph)."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm: unknown option {norm!r}; expected one of {', '.join(map(repr, NORMS))}")
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(
            f"distance: unknown option {distance!r}; expected one of {', '.join(map(repr, DISTANCES))}"
        )
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise TypeError(f"weight: expected a float, got {type(weight).__name__}")
    weight = float(weight)
    # Plain comparisons (false for NaN and +-inf): under torch.compile a float argument may
    # be traced symbolically, and comparisons of it become guards on the Python value,
    # where np.isfinite / math.isfinite would be a data-dependent op or a graph break.
    if not -math.inf < weight < math.inf:
        raise ValueError(f"weight: must be finite, got {weight}")
    return weight


def _check_torch_args(x: "torch.Tensor", y: Any, mask: Any) -> None:
    if not is_tensor(y):
        raise TypeError(f"y: expected a torch.Tensor like x, got {type(y).__name__}")
    if mask is not None and not is_tensor(mask):
        raise TypeError(f"mask: expected a torch.Tensor like x, got {type(mask).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")


def _native_contiguous(a: np.ndarray) -> np.ndarray:
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    # a copy also realigns misaligned buffers (views into byte arrays)
    return np.require(a, requirements=["C", "A"])


def _launch_feature_distance(
    x: "torch.Tensor", y: "torch.Tensor", mask: Optional["torch.Tensor"], loss: "torch.Tensor",
    grad: Optional["torch.Tensor"], norm: str, distance: str, weight: float,
) -> None:
    """The raw kernel call: writes loss (N,) float64 and, when given, grad (x's shape and
    dtype). All tensors contiguous on x's device."""
    cuda_args: tuple = ()
    if x.is_cuda:
        workspace = torch.empty(_C.feature_distance_workspace(x.shape[0], x.shape[1]), dtype=torch.float64,
                                device=x.device)
        cuda_args = (stream_of(x), as_c_arg(workspace), cuda_kernels(x.device))
    _C.feature_distance(as_c_arg(x), as_c_arg(y), as_c_arg(mask), as_c_arg(loss), as_c_arg(grad),
                        norm, distance, weight, *cuda_args)


def _forward_torch(
    x: "torch.Tensor", y: "torch.Tensor", mask: Optional["torch.Tensor"], norm: str, distance: str,
    weight: float, need_grad: bool,
) -> Tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """Loss (N,) in x's dtype and, when need_grad, d(sum loss)/dx in x's dtype: the C/CUDA
    kernel, or the plain-PyTorch backend where ``_backend.use_native_kernels`` says so."""
    _check_torch_args(x, y, mask)
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    if mask is not None:
        mask = mask.detach().contiguous()
    if not use_native_kernels(x.device):
        from . import _torch_backend

        loss, grad = _torch_backend.feature_distance(x, y, mask, norm, distance, weight, need_grad)
        return loss.to(x.dtype), grad
    loss = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    grad = torch.empty_like(x) if need_grad else None
    if x.is_cuda and x.numel() == 0:
        loss.zero_()  # nothing to launch: every plane is empty
    else:
        _launch_feature_distance(x, y, mask, loss, grad, norm, distance, weight)
    return loss.to(x.dtype), grad


def _forward_numpy(
    x: np.ndarray, y: Any, mask: Any, norm: str, distance: str, weight: float
) -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise TypeError(f"y: expected a numpy.ndarray like x, got {type(y).__name__}")
    if mask is not None and not isinstance(mask, np.ndarray):
        raise TypeError(f"mask: expected a numpy.ndarray like x, got {type(mask).__name__}")
    x, y = _native_contiguous(x), _native_contiguous(y)
    if mask is not None:
        mask = _native_contiguous(mask)
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) array, got shape {x.shape}")
    loss = np.empty(x.shape[0], dtype=np.float64)
    _C.feature_distance(x, y, mask, loss, None, norm, distance, weight, 0, None)
    return loss.astype(x.dtype)


def _scale_kept_gradient(grad: "torch.Tensor", grad_loss: "torch.Tensor", reentrant: bool) -> "torch.Tensor":
    """d(sum_n g_n loss_n)/dx from the kept d(sum loss)/dx: grad[n] * grad_loss[n].

    In place unless ``reentrant`` (the kept buffer is then spent: a second backward
    through the same graph trips autograd's version check)."""
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


if torch is not None:

    class FeatureDistanceFunction(torch.autograd.Function):
        """Autograd wrapper (the path for torch < 2.4, and a public building block):
        forward runs the fused kernel (loss and grad), backward multiplies the kept
        gradient by grad_output[n].

        By default backward scales the kept gradient in place and hands it over: no second
        x-sized allocation (on CPU its page faults cost as much as the kernel). The buffer
        is then spent, and a second backward through the same graph raises torch's
        "modified by an inplace operation" error. ``reentrant=True`` keeps it intact
        (retain_graph, gradcheck) at the price of a scaled copy per backward."""

        @staticmethod
        def forward(ctx, x, y, mask, norm, distance, weight, reentrant=False):  # type: ignore[override]
            loss, grad = _forward_torch(x, y, mask, norm, distance, weight, need_grad=x.requires_grad)
            ctx.save_for_backward(grad if grad is not None else torch.empty(0))
            ctx.has_grad = grad is not None
            ctx.reentrant = bool(reentrant)
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss):  # type: ignore[override]
            nones = (None,) * 6
            (grad,) = ctx.saved_tensors
            if not ctx.has_grad or not ctx.needs_input_grad[0]:
                return (None,) + nones
            return (_scale_kept_gradient(grad, grad_loss, ctx.reentrant),) + nones

else:  # pragma: no cover
    FeatureDistanceFunction = None  # type: ignore[assignment,misc]


def feature_distance(
    x: Any,
    y: Any,
    mask: Any = None,
    *,
    norm: str = "shared",
    distance: str = "mse",
    weight: float = 1.0,
    reentrant: bool = False,
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

    Returns:
        (N,) loss in x's dtype (a tensor or an array like x). Accumulation is fp32 for
        16-bit inputs and fp64 for float64.
    """
    weight = _check_options(norm, distance, weight)
    check_kind("x", x)
    if isinstance(x, np.ndarray):
        return _forward_numpy(x, y, mask, norm, distance, weight)
    _check_torch_args(x, y, mask)
    need_grad = bool(x.requires_grad and torch.is_grad_enabled())
    if _ops.HAS_CUSTOM_OPS:
        # y and mask are constants: detached, so autograd never asks for their gradient.
        loss, _ = torch.ops.lpl_ext.feature_distance(
            x, y.detach(), None if mask is None else mask.detach(), norm, distance, weight, need_grad,
            bool(reentrant))
        return loss
    if need_grad:
        return FeatureDistanceFunction.apply(x, y, mask, norm, distance, weight, reentrant)
    loss, _ = _forward_torch(x, y, mask, norm, distance, weight, need_grad=False)
    return loss
