"""When the prediction is a copy of the target, the loss and its gradient are exactly 0,
on every device: x*s - y*s must round to 0 when x == y, which needs the GPU to compute
without FMA contraction as the CPU does (docs/spec.md, "CPU and GPU agree")."""

from __future__ import annotations

import pytest
import torch

import lpl_ext
from lpl_ext._options import DISTANCES, NORMS  # the C module's lists, pinned in test_layering.py

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def copy_of_target(dtype: torch.dtype, masked: bool, device: str = "cpu") -> tuple:
    """(x, y, mask) with x the target the kernels see: y * keep (docs/spec.md, "Feature
    distance"); x does not require grad. Shapes (2, 5, 9, 13); mask None or bool."""
    g = torch.Generator().manual_seed(7)
    # values of every magnitude, so that products x*s are inexact and would leave an FMA
    # residue; a few large channels, as decoder features have
    y = torch.randn(2, 5, 9, 13, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 5).view(1, 5, 1, 1)
    y = y.to(dtype).to(device)
    mask = (torch.rand(y.shape, generator=g) > 0.3).to(device) if masked else None
    return (y * mask if masked else y).clone(), y, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_copy_of_target_gives_exact_zero(device, dtype, norm, distance, masked):
    x, y, mask = copy_of_target(dtype, masked, device)
    x.requires_grad_(True)
    loss = lpl_ext.feature_distance(x, y, mask, norm=norm, distance=distance, weight=0.75)
    (loss * torch.tensor([1.5, -2.0], dtype=loss.dtype, device=device)).sum().backward()
    assert loss.dtype == dtype
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x.grad)), x.grad.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_nonzero_difference_is_not_zero(device):
    """The exact zeros above come from x == y, not from a loss that ignores its input."""
    y = torch.randn(2, 5, 9, 13, dtype=torch.float32, device=device)
    x = (y + 1e-3).requires_grad_(True)
    loss = lpl_ext.feature_distance(x, y, None, norm="shared", distance="l1")
    loss.sum().backward()
    assert bool((loss > 0).all())
    assert bool((x.grad != 0).any())
