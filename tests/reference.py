"""Plain-PyTorch formulations of docs/spec.md: the naive oracle the fused kernels are
compared against, and (last section) the reference's own vectorized head, which the
benchmarks time as their "eager" variant. Nothing here is used by lpl_ext itself, and this
module never imports lpl_ext: benchmark workers import it (tests/ on their sys.path) so that
an eager worker's time and memory hold nothing of lpl_ext."""

from __future__ import annotations

import math
from typing import Optional, Sequence

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


# ---------------------------------------------------------------------------- the timed baseline
# The loss head as the reference writes it, vectorized over planes: kthvalue/std on the
# flattened planes, max_pool2d morphology, the masks applied by multiplying with a float
# keep mask. It is a second formulation on purpose: the benchmarks must time the fast
# batched code a user of the reference runs, while the oracle above loops over planes and
# selects with `where` (docs/spec.md, "Non-finite policy"), which this one does not.
# tests/test_benchmarks_smoke.py checks it against the oracle on finite inputs.

NORMS = ("default", "shared", "batch", "none")
DISTANCES = ("mse", "l1")
# docs/spec.md, "Window sizes": pyramid level -> down factor of its outlier windows
# (levels 0 and 1 are never masked).
OUTLIER_DOWN_FACTOR = {2: 2, 3: 1, 4: 1}


def layer_weight(index: int, pow_law: bool) -> float:
    """Weight of pyramid level ``index`` (docs/spec.md, "Loss module"): 2^-min(index, 3)
    with pow_law, else 1."""
    return 2.0 ** (-min(index, 3)) if pow_law else 1.0


def reference_outlier_keep(y: torch.Tensor, closing: int, opening: int, quantile: float = 0.02,
                           margin_std: float = 2.0) -> torch.Tensor:
    """docs/spec.md, "Outlier mask", vectorized over planes (k clamped into [1, L]; y finite):
    keep mask (N, C, H, W) in y's dtype, 1 keep, 0 drop."""
    n, c, h, w = y.shape
    length = h * w
    planes = y.reshape(n * c, length)
    k1 = min(max(int(math.floor(length * quantile)), 1), length)
    k2 = min(max(int(math.floor(length * (1 - quantile))), 1), length)
    q1 = planes.kthvalue(k1, dim=1).values.unsqueeze(1)
    q2 = planes.kthvalue(k2, dim=1).values.unsqueeze(1)
    margin = margin_std * planes.std(dim=1).unsqueeze(1)
    keep = ((q1 - margin < planes) & (planes < q2 + margin)).to(y.dtype).view(n, c, h, w)
    if closing > 1:
        keep = F.max_pool2d(keep, closing, stride=1, padding=(closing - 1) // 2)
    if opening > 1:
        keep = -F.max_pool2d(-keep, opening, stride=1, padding=(opening - 1) // 2)
    return keep


def reference_layer(x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor], norm: str, distance: str,
                    weight: float) -> torch.Tensor:
    """docs/spec.md, "Normalization" and "Feature distance", for one layer as the reference
    computes them (keep: float mask in x's dtype, or None), differentiable in x: (N,)."""
    if keep is not None:
        y = y * keep
    if norm in ("default", "shared"):  # over the channel norms: each side its own, or both the target's
        y_norm = y.pow(2).sum(1, keepdim=True).sqrt()
        x_norm = x.pow(2).sum(1, keepdim=True).sqrt() if norm == "default" else y_norm
        eps = 1e-10 if norm == "default" else 1e-6
        x, y = x / (x_norm + eps), y / (y_norm + eps)
    elif norm == "batch":
        var, mean = torch.var_mean(y, dim=(0, 2, 3), keepdim=True, correction=1)
        denom = var.sqrt() + 1e-6
        x, y = (x - mean) / denom, (y - mean) / denom
    d = x - y
    e = d * d if distance == "mse" else d.abs()
    if keep is not None:
        e = e * keep
        count = keep.sum((2, 3))
        term = torch.where(count > 0, e.sum((2, 3)) / count.clamp_min(1), torch.zeros_like(count))
    else:
        term = e.sum((2, 3)) / (e.shape[2] * e.shape[3])
    return weight * term.mean(1)


def reference_head(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], layers: Sequence[int], norm: str,
                   distance: str, outliers: bool, pow_law: bool = True) -> torch.Tensor:
    """The whole head over the pyramid levels ``layers`` (xs[j], ys[j] are level
    layers[j]): outlier masks of the target on the masked levels, then the mean of the
    weighted per-layer losses. (N,)."""
    total = None
    for i, x, y in zip(layers, xs, ys):
        keep = None
        if outliers and i in OUTLIER_DOWN_FACTOR:
            with torch.no_grad():
                keep = reference_outlier_keep(y, *outlier_windows(OUTLIER_DOWN_FACTOR[i]))
        loss = reference_layer(x, y, keep, norm, distance, layer_weight(i, pow_law))
        total = loss if total is None else total + loss
    return total / len(xs)
