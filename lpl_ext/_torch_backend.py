"""lpl_ext's plain-PyTorch backend: the arithmetic of docs/spec.md ("Outlier mask",
"Normalization", "Feature distance") written with torch operations, for tensors on
devices that lpl_ext's C/CUDA kernels do not serve (Apple MPS, Intel XPU, AMD GPUs
under a ROCm build of torch, any other device), and on any device with
``LPL_EXT_BACKEND=torch``. Which backend runs is decided in ``lpl_ext._backend``.

It is the library's own second implementation, not the tests' oracle: it computes
what the kernels compute, with the same per-element formulas and roundings, and
returns what they return (the loss and, in the same call, the gradient with respect
to x; the keep-mask and the layer statistics). What may differ from the kernels is
the order of the sums (docs/spec.md, "CPU and GPU agree"), so losses and gradients
agree to reduction order and masks are bit-identical wherever the spread's last bit
does not decide a threshold. On a device without float64 (MPS), the quantities the
spec computes in double (per-plane totals, coefficients, loss, spread, statistics) are
computed in float32, and the quantile ranks are computed on the host (one small copy
per call), so that they stay exact.

Inputs arrive validated (``lpl_ext._options``, with the C entry points' messages); the
option tables below are keyed by option name and checked against the C module's lists
at import.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ._options import DISTANCES, NORMS, require_every_option

# docs/spec.md, "Normalization": eps per option (none: no normalization, no eps).
_EPS: Dict[str, Optional[float]] = {"default": 1e-10, "shared": 1e-6, "batch": 1e-6, "none": None}
# docs/spec.md, "Feature distance": e(d) and de/dd per distance (sign(d), 0 at 0, for l1).
_DISTANCE: Dict[str, Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "mse": (lambda d: d * d, lambda d: 2.0 * d),
    "l1": (torch.abs, lambda d: (d > 0).to(d.dtype) - (d < 0).to(d.dtype)),
}
require_every_option("norm", _EPS, NORMS, where="lpl_ext._torch_backend")
require_every_option("distance", _DISTANCE, DISTANCES, where="lpl_ext._torch_backend")
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Device types known to lack float64 (MPS has no float64 at all).
_NO_FLOAT64 = frozenset({"mps"})
_float64_probe: Dict[str, bool] = {}


def has_float64(device: Any, probe: bool = True) -> bool:
    """Whether tensors on ``device`` can be float64 (CPU, CUDA, ROCm: yes; MPS: no;
    other device types are probed once with a tiny float64 product; ``probe=False``
    assumes yes for a device type not probed yet, as fake-tensor tracing must)."""
    kind = torch.device(device).type
    if kind in ("cpu", "cuda", "meta"):
        return True
    if kind in _NO_FLOAT64:
        return False
    if kind not in _float64_probe:
        if not probe:
            return True
        try:
            probe = torch.ones((), dtype=torch.float64, device=device) * 2.0
            _float64_probe[kind] = bool(probe.cpu() == 2.0)
        except (RuntimeError, TypeError, NotImplementedError):
            _float64_probe[kind] = False
    return _float64_probe[kind]


def wide_dtype(device: Any, probe: bool = True) -> torch.dtype:
    """The dtype of what the spec computes in double: float64, or float32 where the
    device has no float64."""
    return torch.float64 if has_float64(device, probe) else torch.float32


def feature_distance(
    x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor], norm: str, distance: str, weight: float,
    need_grad: bool, plane_moments: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """docs/spec.md, "Feature distance": (loss (N,) in the wide dtype, d(sum loss)/dx in
    x's shape and dtype when ``need_grad``, else None). x, y (N, C, H, W) of one float
    dtype, mask bool/uint8 or None; ``plane_moments`` (N*C, 3) = mean, M2, kept of
    where(mask, y, 0) per plane (with a mask only), from which the kept counts and the
    batch statistics are taken, or None; arguments already validated."""
    n, c, h, w = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wide = wide_dtype(x.device)
    zero = torch.zeros((), dtype=acc, device=x.device)
    xa = x.detach().to(acc)
    ya = y.detach().to(acc)
    k: Optional[torch.Tensor] = None
    if mask is not None:
        keep = mask.detach() != 0
        ya = torch.where(keep, ya, zero)  # a selection: a NaN under the mask never reaches a sum
        k = keep.to(acc)
        if plane_moments is not None:
            kept = plane_moments[:, 2].reshape(n, c).to(wide)  # exact integers: the same counts
        else:
            kept = keep.sum(dim=(2, 3)).to(wide)
    else:
        kept = torch.full((n, c), float(h * w), dtype=wide, device=x.device)
    # coef = w / (C * M), 0 for an empty plane (exact integer counts in double).
    denom = kept * float(c)
    coef = torch.where(kept > 0, torch.tensor(float(weight), dtype=wide, device=x.device) / denom.clamp_min(1.0),
                       torch.zeros((), dtype=wide, device=x.device))

    rx = ry = nx = None
    a = b = None
    if norm in ("default", "shared"):
        eps = _EPS[norm]
        ry = 1.0 / ((ya * ya).sum(dim=1, keepdim=True).sqrt() + eps)
        if norm == "default":
            nx = (xa * xa).sum(dim=1, keepdim=True).sqrt()
            rx = 1.0 / (nx + eps)
            d = xa * rx - ya * ry
        else:
            d = xa * ry - ya * ry
    elif norm == "batch":
        # Per-channel mean and unbiased std of y*keep over (n, h, w), in the wide dtype;
        # NaN std for a single value (torch semantics).
        count = n * h * w
        if plane_moments is not None and count > 0:
            # the planes' (mean, M2) of h*w values each, merged over n (Chan's formula, all
            # at once: equal counts): the kernels' sequential merge within rounding
            pm = plane_moments.to(wide).reshape(n, c, 3)
            mean = pm[:, :, 0].mean(dim=0)
            spread = pm[:, :, 0] - mean
            m2 = pm[:, :, 1].sum(dim=0) + float(h * w) * (spread * spread).sum(dim=0)
            mean = mean.view(1, c, 1, 1)
            std = (m2 / (count - 1)).sqrt().view(1, c, 1, 1) if count > 1 else torch.full_like(mean, float("nan"))
        else:
            yw = ya.to(wide)
            mean = yw.sum(dim=(0, 2, 3), keepdim=True) / max(count, 1)
            if count > 1:
                dev = yw - mean
                std = ((dev * dev).sum(dim=(0, 2, 3), keepdim=True) / (count - 1)).sqrt()
            else:
                std = torch.full_like(mean, float("nan"))
        a = (1.0 / (std + _EPS["batch"])).to(acc)
        b = mean.to(acc)
        d = (xa - b) * a - (ya - b) * a
    else:
        d = xa - ya

    value, deriv_of = _DISTANCE[distance]
    e = value(d)
    ke = e if k is None else k * e
    sums = ke.sum(dim=(2, 3), dtype=wide)
    loss = (coef * sums).sum(dim=1)

    grad = None
    if need_grad:
        cf = coef.to(acc)[:, :, None, None]
        deriv = deriv_of(d)
        g = (cf if k is None else cf * k) * deriv
        if norm == "shared":
            gx = g * ry
        elif norm == "batch":
            gx = g * a
        elif norm == "none":
            gx = g
        else:
            # dx_c = rx g_c - q x_c, q = (rx^2 / ||x||) sum_c g_c x_c, 0 where ||x|| = 0
            dot = (g * xa).sum(dim=1, keepdim=True)
            positive = nx > 0
            q = torch.where(positive, (rx * rx / torch.where(positive, nx, torch.ones_like(nx))) * dot, zero)
            gx = rx * g - q * xa
        grad = gx.to(x.dtype).contiguous()
    return loss, grad


def _quantile_ranks(count: torch.Tensor, quantile: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-indexed ranks floor(L_f * q) and floor(L_f * (1 - q)), clamped into [1, L_f]
    (1 where L_f = 0), as int64 (P,). The products are in double, on the host where the
    device has no float64 (a float32 product can land on the other side of an integer)."""
    ranks = []
    if has_float64(device):
        c = count.to(torch.float64)
        for q in (quantile, 1.0 - quantile):
            r = torch.floor(c * q).to(torch.int64)
            ranks.append(torch.minimum(r, count).clamp_min(1))
    else:
        counts = count.cpu().tolist()
        for q in (quantile, 1.0 - quantile):
            r = [max(min(int(math.floor(n * q)), n), 1) for n in counts]
            ranks.append(torch.tensor(r, dtype=torch.int64, device=device))
    return ranks[0], ranks[1]


def _max_filter(m: torch.Tensor, window: int) -> torch.Tensor:
    """Max over a window x window neighbourhood, positions outside ignored (max_pool2d,
    stride 1, padding (window - 1) // 2), as a row pass then a column pass. A radius
    beyond the plane is cut to the plane (the same result, without a huge window)."""
    r = (window - 1) // 2
    rw, rh = min(r, m.shape[-1] - 1), min(r, m.shape[-2] - 1)
    if rw > 0:
        m = F.max_pool2d(m, (1, 2 * rw + 1), stride=1, padding=(0, rw))
    if rh > 0:
        m = F.max_pool2d(m, (2 * rh + 1, 1), stride=1, padding=(rh, 0))
    return m


def plane_moments(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N*C, 3) float64: per (n, c) plane the mean of where(keep, y, 0) over its h*w values,
    its M2 (sum of squared deviations from that mean) and the kept count (lpl_kernel_abi.h's
    layout), two passes in float64; the kernels' values within the rounding of their order
    of the sums. Zeros for planes of no value. RuntimeError on a device without float64."""
    if not has_float64(y.device):
        raise RuntimeError(f"plane_moments: float64, which {y.device.type} tensors cannot hold")
    n, c, h, w = y.shape
    if h * w == 0:
        return torch.zeros((n * c, 3), dtype=torch.float64, device=y.device)
    keep = keep.reshape(n * c, h * w)
    masked = torch.where(keep, y.reshape(n * c, h * w).to(torch.float64),
                         torch.zeros((), dtype=torch.float64, device=y.device))
    mean = masked.mean(dim=1)
    dev = masked - mean[:, None]
    return torch.stack([mean, (dev * dev).sum(dim=1), keep.sum(dim=1).to(torch.float64)], dim=1)


def outlier_mask(
    y: torch.Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
    return_plane_moments: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """docs/spec.md, "Outlier mask": (keep bool of y's shape, stats (3,) = mean, std,
    outlier ratio in the wide dtype, or None, :func:`plane_moments` or None). y (N, C, H, W)
    float; options already validated."""
    keep, stats = _outlier_mask(y.detach(), quantile, margin_std, closing, opening, return_stats)
    return keep, stats, plane_moments(y.detach(), keep) if return_plane_moments else None


def _outlier_mask(
    y: torch.Tensor, quantile: float, margin_std: float, closing: int, opening: int, return_stats: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    n, c, h, w = y.shape
    device = y.device
    wide = wide_dtype(device)
    planes_n, length = n * c, h * w
    if planes_n == 0 or length == 0:
        keep = torch.zeros(y.shape, dtype=torch.bool, device=device)
        stats = torch.full((3,), float("nan"), dtype=wide, device=device) if return_stats else None
        return keep, stats

    # 16-bit values are exact in float32: order statistics and comparisons there.
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    planes = y.reshape(planes_n, length).to(work)
    finite = torch.isfinite(planes)
    count = finite.sum(dim=1)
    inf = torch.tensor(float("inf"), dtype=work, device=device)

    # 1. exact order statistics of the finite values (non-finite ones sorted last)
    ordered = torch.where(finite, planes, inf).sort(dim=1).values
    r1, r2 = _quantile_ranks(count, quantile, device)
    q1 = ordered.gather(1, (r1 - 1)[:, None]).squeeze(1)
    q2 = ordered.gather(1, (r2 - 1)[:, None]).squeeze(1)

    # 2. sample std of the finite values, two passes with the mean's error removed
    pw = planes.to(wide)
    zero_w = torch.zeros((), dtype=wide, device=device)
    count_w = count.to(wide)
    mean = torch.where(finite, pw, zero_w).sum(dim=1) / count_w.clamp_min(1.0)
    dev = torch.where(finite, pw - mean[:, None], zero_w)
    sum_sq, sum_dev = (dev * dev).sum(dim=1), dev.sum(dim=1)
    m2 = (sum_sq - sum_dev * sum_dev / count_w.clamp_min(1.0)).clamp_min(0.0)
    std = (m2 / (count_w - 1.0).clamp_min(1.0)).sqrt()
    largest = torch.where(finite, planes, -inf).amax(dim=1)
    constant = ordered[:, 0] == largest  # every finite value the same: std exactly 0
    std = torch.where(constant, zero_w, std)
    std = torch.where(count < 2, zero_w, std)
    std = torch.where(count == 1, torch.full_like(std, float("nan")), std)

    # 3. thresholds rounded as torch rounds them in y's dtype
    if y.dtype == torch.float64:
        m = margin_std * std
        lo, hi = q1 - m, q2 + m
    else:
        f32 = torch.float32
        s = std.to(f32)
        margin = torch.tensor(margin_std, dtype=f32, device=device)
        if y.dtype in _HALF_DTYPES:
            t = y.dtype
            s = s.to(t).to(f32)
            m = (margin * s).to(t).to(f32)
            lo, hi = (q1 - m).to(t).to(f32), (q2 + m).to(t).to(f32)
        else:
            m = margin * s
            lo, hi = q1 - m, q2 + m
    keep0 = (lo[:, None] < planes) & (planes < hi[:, None])

    # 4. closing (max filter), then opening (min filter), on 0/1 values
    keep1 = keep0.to(torch.float32).view(planes_n, 1, h, w)
    keep1 = _max_filter(keep1, closing)
    keep2 = -_max_filter(-keep1, opening)
    # 5. finite
    keep = (keep2 > 0.5).view(n, c, h, w) & torch.isfinite(y)

    stats = None
    if return_stats:
        total = y.numel()
        masked = torch.where(keep, y.to(wide), zero_w)
        layer_mean = masked.sum() / total
        if total > 1:
            centred = masked - layer_mean
            layer_std = ((centred * centred).sum() / (total - 1)).sqrt()
        else:
            layer_std = torch.full_like(layer_mean, float("nan"))
        ratio = 1.0 - keep.sum().to(wide) / total
        stats = torch.stack([layer_mean, layer_std, ratio])
    return keep, stats


__all__ = ["feature_distance", "has_float64", "outlier_mask", "plane_moments", "wide_dtype"]
