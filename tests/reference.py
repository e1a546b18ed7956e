"""Plain-PyTorch formulations of docs/spec.md, written for the tests: the naive oracle the
fused kernels are compared against. Nothing here is used by lpl_ext itself."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def ref_feature_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    norm: str = "shared",
    distance: str = "mse",
    weight: float = 1.0,
) -> torch.Tensor:
    """docs/spec.md, "Normalization" and "Feature distance", for one layer, differentiable
    in x. Returns (N,)."""
    keep = torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()
    ym = torch.where(keep, y, torch.zeros_like(y))
    k = keep.to(x.dtype)
    if norm == "default":
        nx = x.pow(2).sum(1, keepdim=True).sqrt()
        ny = ym.pow(2).sum(1, keepdim=True).sqrt()
        xn, yn = x / (nx + 1e-10), ym / (ny + 1e-10)
    elif norm == "shared":
        ny = ym.pow(2).sum(1, keepdim=True).sqrt()
        xn, yn = x / (ny + 1e-6), ym / (ny + 1e-6)
    elif norm == "batch":
        mean = ym.mean(dim=(0, 2, 3), keepdim=True)
        std = ym.transpose(0, 1).reshape(ym.shape[1], -1).std(dim=1).view(1, -1, 1, 1)
        xn, yn = (x - mean) / (std + 1e-6), (ym - mean) / (std + 1e-6)
    elif norm == "none":
        xn, yn = x, ym
    else:
        raise ValueError(norm)
    d = xn - yn
    e = (d * d if distance == "mse" else d.abs()) * k
    s = e.sum((2, 3))
    m = k.sum((2, 3))
    term = torch.where(m > 0, weight * s / m.clamp_min(1), torch.zeros_like(s))
    return term.mean(1)


def outlier_windows(down_factor: int) -> tuple[int, int]:
    """(closing, opening) of the reference for a down factor."""
    opening = int(math.ceil(5 / down_factor))
    closing = int(math.ceil(3 / down_factor))
    if opening == 2:
        opening = 3
    if closing == 2:
        closing = 1
    return closing, opening


def ref_outlier_mask(
    y: torch.Tensor, quantile: float = 0.02, margin_std: float = 2.0, closing: int = 3, opening: int = 5
) -> torch.Tensor:
    """docs/spec.md, "Outlier mask" (kthvalue, std, max_pool2d), with k clamped into [1, L] and
    non-finite values never kept nor counted. Bool (N, C, H, W)."""
    n, c, h, w = y.shape
    flat = y.reshape(n * c, h * w)
    keep = torch.zeros(n * c, h * w, dtype=torch.bool)
    for i in range(n * c):
        p = flat[i]
        finite = torch.isfinite(p)
        vals = p[finite]
        cnt = vals.numel()
        if cnt == 0:
            continue
        k1 = min(max(int(math.floor(cnt * quantile)), 1), cnt)
        k2 = min(max(int(math.floor(cnt * (1 - quantile))), 1), cnt)
        q1 = vals.kthvalue(k1).values
        q2 = vals.kthvalue(k2).values
        # Std of a plane as the reference's batched (N, C, L) reduction computes it (exactly
        # 0 for a constant plane; a 1-D torch.std sums the mean in the dtype and can be off
        # by an ulp there, keeping a constant plane that the batched reference drops).
        m = margin_std * torch.stack([vals, vals]).std(dim=1)[0]
        keep[i] = finite & (q1 - m < p) & (p < q2 + m)
    keep = keep.view(n, c, h, w).float()
    keep = F.max_pool2d(keep, closing, stride=1, padding=(closing - 1) // 2)
    keep = -F.max_pool2d(-keep, opening, stride=1, padding=(opening - 1) // 2)
    return keep.bool() & torch.isfinite(y)
