"""The ops' options and argument checks, each defined once.

Option lists: ``NORMS`` and ``DISTANCES`` are ``lpl_ext._C.NORMS`` / ``_C.DISTANCES``, which
the C module builds from the one list of each in ``csrc/lpl_math.h`` (the same lists give the
kernels' enums, so a name and its enum value cannot drift apart). Python-side tables keyed
by option name (the plain-PyTorch backend's, the loss module's) are checked against them at
import with :func:`require_every_option`.

Argument checks: what the public functions validate before anything runs, with the
messages of the C entry points (``csrc/lpl_interop.c``), so that a bad argument reads the
same whichever backend would have run (tests/test_layering.py compares the two). The C
entry points check again: they are the memory-safety boundary for anyone calling ``_C``
directly.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Optional, Tuple

import numpy as np

from . import _C
from ._backend import torch

#: The ``norm`` options of the feature distance, in the kernels' enum order.
NORMS: Tuple[str, ...] = tuple(_C.NORMS)
#: The ``distance`` options of the feature distance, in the kernels' enum order.
DISTANCES: Tuple[str, ...] = tuple(_C.DISTANCES)

#: Python numbers a float option accepts (bool excluded: ``weight=True`` is a mistake).
_REALS = (int, float, np.integer, np.floating)
_INTS = (int, np.integer)


def require_every_option(kind: str, handled: Collection[str], options: Tuple[str, ...], where: str) -> None:
    """ImportError unless ``handled`` names exactly the ``options`` of ``kind`` (the C
    module's list): a table keyed by option name that misses one, or knows one the kernels
    do not, would otherwise fail only when that option is used."""
    missing = [o for o in options if o not in handled]
    unknown = sorted(set(handled) - set(options))
    if missing or unknown:
        raise ImportError(f"{where}: its {kind} table does not match lpl_ext._C's {kind} options {options}: "
                          f"missing {missing}, unknown {unknown}; csrc/lpl_math.h and this table must change "
                          "together")


def _choices(options: Tuple[str, ...]) -> str:
    return ", ".join(map(repr, options))


def check_feature_distance_options(norm: Any, distance: Any, weight: Any) -> float:
    """Validates norm, distance and weight; returns weight as a float. Plain Python values:
    under torch.compile these checks run at trace time and leave nothing in the graph."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm: unknown option {norm!r}; expected one of {_choices(NORMS)}")
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance: unknown option {distance!r}; expected one of {_choices(DISTANCES)}")
    if isinstance(weight, bool) or not isinstance(weight, _REALS):
        raise TypeError(f"weight: expected a float, got {type(weight).__name__}")
    weight = float(weight)
    # Plain comparisons (false for NaN and +-inf): under torch.compile a float argument may
    # be traced symbolically, and comparisons of it become guards on the Python value,
    # where np.isfinite / math.isfinite would be a data-dependent op or a graph break.
    if not -math.inf < weight < math.inf:
        raise ValueError(f"weight: must be finite, got {weight}")
    return weight


def check_outlier_mask_options(quantile: Any, margin_std: Any, closing: Any,
                               opening: Any) -> Tuple[float, float, int, int]:
    """Validates the outlier-mask options; returns them as (float, float, int, int)."""
    for name, v in (("quantile", quantile), ("margin_std", margin_std)):
        if isinstance(v, bool) or not isinstance(v, _REALS):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    quantile, margin_std = float(quantile), float(margin_std)
    if not (0.0 < quantile < 0.5):
        raise ValueError(f"quantile: must be in the open interval (0, 0.5), got {quantile}")
    if not (math.isfinite(margin_std) and margin_std >= 0.0):
        raise ValueError(f"margin_std: must be a finite number >= 0, got {margin_std}")
    for name, v in (("closing", closing), ("opening", opening)):
        if isinstance(v, bool) or not isinstance(v, _INTS):
            raise TypeError(f"{name}: expected an odd positive int, got {type(v).__name__}")
        if v < 1 or v % 2 == 0:
            raise ValueError(f"{name}: window size must be odd and positive, got {v}")
        if v > 2**31 - 1:
            raise ValueError(f"{name}: window size too large, got {v}")
    return quantile, margin_std, int(closing), int(opening)


def is_tensor(obj: Any) -> bool:
    """True for a torch.Tensor (False when torch is not installed)."""
    return torch is not None and isinstance(obj, torch.Tensor)


def check_kind(name: str, obj: Any) -> None:
    """TypeError unless obj is a torch.Tensor or numpy.ndarray."""
    if not (is_tensor(obj) or isinstance(obj, np.ndarray)):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")


def check_same_kind(name: str, obj: Any, ref: Any) -> None:
    """TypeError unless obj is of ref's kind (both torch tensors or both numpy arrays)."""
    if is_tensor(ref) and not is_tensor(obj):
        raise TypeError(f"{name}: expected a torch.Tensor like x, got {type(obj).__name__}")
    if isinstance(ref, np.ndarray) and not isinstance(obj, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray like x, got {type(obj).__name__}")


def _shape(a: Any) -> str:
    return ", ".join(str(int(d)) for d in a.shape)


def check_nchw(name: str, a: Any) -> None:
    """ValueError unless a (tensor or array) is 4-D."""
    if a.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) tensor, got {a.ndim}-D")


def check_same_shape(name: str, a: Any, ref_name: str, ref: Any) -> None:
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: shape ({_shape(a)}) does not match {ref_name} shape ({_shape(ref)})")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _device_name(t: Any) -> str:
    return f"{t.device.type}:{t.device.index or 0}"


def _check_float_tensor(name: str, t: Any) -> None:
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {_dtype_name(t.dtype)}")


def _check_same_device(name: str, t: Any, ref_name: str, ref: Any) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: on {_device_name(t)} but {ref_name} is on {_device_name(ref)}")


def check_feature_distance_args(x: Any, y: Any, mask: Optional[Any]) -> None:
    """The feature distance's arrays, in the C entry point's order and words: x 4-D; y of
    x's kind, 4-D, x's shape; mask None or of x's kind and shape. Torch tensors also: float
    x, y of x's device and dtype, a bool or uint8 mask on x's device (for numpy arrays the
    C entry point checks dtypes, its only caller)."""
    check_same_kind("y", y, x)
    if mask is not None:
        check_same_kind("mask", mask, x)
    torch_args = is_tensor(x)
    check_nchw("x", x)
    if torch_args:
        _check_float_tensor("x", x)
    check_nchw("y", y)
    if torch_args:
        _check_float_tensor("y", y)
    check_same_shape("y", y, "x", x)
    if torch_args:
        _check_same_device("y", y, "x", x)
        if y.dtype != x.dtype:
            raise TypeError(f"y: dtype {_dtype_name(y.dtype)} does not match x dtype {_dtype_name(x.dtype)}")
    if mask is None:
        return
    if torch_args:
        if mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"mask: expected a bool or uint8 mask, got {_dtype_name(mask.dtype)}")
    check_nchw("mask", mask)
    check_same_shape("mask", mask, "x", x)
    if torch_args:
        _check_same_device("mask", mask, "x", x)


def check_plane_moments(plane_moments: Any, x: Any, mask: Optional[Any]) -> None:
    """The feature distance's optional ``plane_moments`` (docs/spec.md, "Feature distance"):
    given only with a mask (they describe ``where(mask, y, 0)``), of x's kind, a float64
    (N*C, 3) array on x's device. Whether they belong to this mask is not checked (that
    would cost the pass they save): the caller passes what the outlier mask returned with it."""
    if plane_moments is None:
        return
    check_same_kind("plane_moments", plane_moments, x)
    if mask is None:
        raise ValueError("plane_moments: given without a mask (they are the moments of where(mask, y, 0) "
                         "that outlier_mask returns with its mask)")
    planes = int(x.shape[0]) * int(x.shape[1])
    if tuple(plane_moments.shape) != (planes, 3):
        raise ValueError(f"plane_moments: expected shape ({planes}, 3) (N*C planes of mean, M2, kept), got "
                         f"({_shape(plane_moments)})")
    if is_tensor(x):
        if plane_moments.dtype != torch.float64:
            raise TypeError(f"plane_moments: expected dtype float64, got {_dtype_name(plane_moments.dtype)}")
        _check_same_device("plane_moments", plane_moments, "x", x)
    elif plane_moments.dtype != np.float64:
        raise TypeError(f"plane_moments: expected dtype float64, got {plane_moments.dtype}")


def check_outlier_mask_args(y: Any) -> None:
    """y 4-D (and, for a torch tensor, of a float dtype), as the C entry point checks it."""
    check_nchw("y", y)
    if is_tensor(y):
        _check_float_tensor("y", y)


__all__ = ["DISTANCES", "NORMS", "check_feature_distance_args", "check_feature_distance_options",
           "check_kind", "check_outlier_mask_args", "check_outlier_mask_options", "check_plane_moments",
           "require_every_option"]
