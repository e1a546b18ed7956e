"""Comparisons of results that take two different arithmetic paths to the same value.

Two torch paths through the same float computation (a module's ``functional_call`` and
a plain decoder, checkpointed and not, eager and compiled, the kernels and a formula)
may pick different convolution algorithms, blockings and summation orders, and which
they pick depends on the CPU. Their results then differ by a few ulp *of the terms that
were summed*, not of the result: an element near zero that is the sum of terms of size
1 can be off by 1e-16 absolute, which is 1e-3 relative to itself. A pure relative
tolerance (``atol=0``) fails there on some machines and not on others.

``assert_close_to_scale`` judges every element at the tensor's own magnitude: ``atol =
rtol * max|want|``. Keep ``rtol=0, atol=0`` (``torch.equal``) for comparisons whose
contract is bit-exactness: masks, the same kernel run twice, x == y giving 0, resume.
"""

from __future__ import annotations

from typing import Optional

import torch


def scale_atol(want: torch.Tensor, rtol: float, floor: float = 0.0) -> float:
    """``rtol * max|want|`` over the finite elements of ``want`` (``floor`` when they are
    all zero or none is finite)."""
    w = torch.as_tensor(want).detach()
    w = w[torch.isfinite(w)] if w.is_floating_point() else w
    peak = float(w.abs().max()) if w.numel() else 0.0
    return max(rtol * peak, floor)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "",
                          floor: float = 0.0, msg: Optional[str] = None) -> None:
    """``assert_close(got, want)`` with ``rtol`` relative and ``rtol * max|want|`` absolute.

    got, want: tensors of one shape (any float dtype; compared as ``assert_close`` does,
    dtypes included). ``floor`` bounds the absolute tolerance from below for a ``want``
    that may be all zeros. ``what`` (or ``msg``) names the compared quantity in the error.
    """
    atol = scale_atol(want, rtol, floor)
    label = msg or what
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                               msg=(lambda m: f"{label}: {m}") if label else None)
