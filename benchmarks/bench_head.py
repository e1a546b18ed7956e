"""LPL loss head on SDXL decoder features, forward + backward: plain-PyTorch eager
reference vs the same code under torch.compile vs lpl_ext.

The head is everything LPL does after the decoder (LPL_SPEC.md sections 2-4): outlier
mask of the target features (kthvalue, std, max_pool2d), normalization, distance,
per-plane reductions, layer weights, the mean over layers; then backward to the
prediction features. Each variant runs in its own fresh worker process (peak RSS is per
variant).

    python -m benchmarks.bench_head                # full CPU grid, prints rows
    python -m benchmarks.bench_head --quick        # micro shapes, seconds
    python -m benchmarks.bench_head --device cuda  # GPU grid (1024px, batch 4)
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

BENCH = "head"
VARIANTS = ("eager", "compile", "lpl_ext")
NORMS = ("default", "shared", "batch", "none")

# SDXL decoder feature pyramid (spec section 1): channels and upscale of each level
# relative to the latent (mid, up0, up1, up2, up3).
LAYER_CHANNELS = (512, 512, 512, 256, 128)
LAYER_SCALE = (1, 2, 4, 8, 8)
LAYER_NAMES = ("mid", "up0", "up1", "up2", "up3")
# Outlier removal of the reference: layer -> down factor (layers 0 and 1 are never masked).
OUTLIER_DOWN_FACTOR = {2: 2, 3: 1, 4: 1}


def outlier_windows(down_factor: int) -> Tuple[int, int]:
    """(closing, opening) window sizes of the reference for a down factor."""
    opening = int(math.ceil(5 / down_factor))
    closing = int(math.ceil(3 / down_factor))
    if opening == 2:
        opening = 3
    if closing == 2:
        closing = 1
    return closing, opening


def layer_weight(index: int, pow_law: bool) -> float:
    return 2.0 ** (-min(index, 3)) if pow_law else 1.0


@dataclass(frozen=True)
class HeadWorkload:
    """One head configuration: which pyramid levels at which resolution and batch, and
    the loss options."""

    resolution: int
    batch: int
    layers: Tuple[int, ...]
    norm: str = "shared"
    distance: str = "mse"
    outliers: bool = True
    pow_law: bool = True
    dtype: str = "float32"

    @property
    def name(self) -> str:
        lay = "pyramid" if self.layers == tuple(range(5)) else "+".join(LAYER_NAMES[i] for i in self.layers)
        return (f"{self.resolution}px_b{self.batch}_{lay}_{self.norm}_{self.distance}"
                f"_{'out' if self.outliers else 'noout'}")

    def shapes(self) -> List[Tuple[int, int, int, int]]:
        lat = self.resolution // 8
        return [(self.batch, LAYER_CHANNELS[i], lat * LAYER_SCALE[i], lat * LAYER_SCALE[i]) for i in self.layers]

    def masked(self, index: int) -> bool:
        return self.outliers and index in OUTLIER_DOWN_FACTOR

    @property
    def elem_size(self) -> int:
        return {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}[self.dtype]

    def values_per_side(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    def feature_bytes(self) -> int:
        """Bytes of the two feature tensors (prediction and target), all layers."""
        return 2 * self.values_per_side() * self.elem_size

    def floor_bytes(self) -> int:
        """Bytes a head must move at least: read x and y, write x.grad, and read a 1-byte
        keep mask on the masked layers."""
        total = 0
        for i, s in zip(self.layers, self.shapes()):
            n = math.prod(s)
            total += 3 * n * self.elem_size + (n if self.masked(i) else 0)
        return total

    def shape_text(self) -> str:
        return " ".join("x".join(map(str, s[1:])) for s in self.shapes()) + f" (N={self.batch})"


def workloads(mode: str, device: str = "cpu") -> List[HeadWorkload]:
    """The grid of a run mode: 'quick' (micro shapes), 'full' (CPU default) or 'gpu'."""
    pyramid = tuple(range(5))
    if mode == "quick":
        # latent 4x4: the smallest pyramid whose masked planes hold >= 50 values
        return [HeadWorkload(32, 2, pyramid, "shared", "mse", True),
                HeadWorkload(32, 2, pyramid, "default", "mse", False)]
    if mode == "gpu" or device.startswith("cuda"):
        grid = [HeadWorkload(1024, 4, pyramid, n, "mse", o) for n in NORMS for o in (False, True)]
        return grid + [HeadWorkload(1024, 4, pyramid, "shared", "l1", True)]
    # CPU: every option set on the 512px pyramid (batch 1: 579 MB per side), the l1
    # distance once, and the largest 1024px level alone (batch 1: 1 GiB per side).
    grid = [HeadWorkload(512, 1, pyramid, n, "mse", o) for n in NORMS for o in (False, True)]
    grid.append(HeadWorkload(512, 1, pyramid, "shared", "l1", True))
    grid.append(HeadWorkload(1024, 1, (3,), "shared", "mse", True))
    return grid


# ---------------------------------------------------------------------------- reference

def reference_outlier_keep(y: Any, closing: int, opening: int, quantile: float = 0.02,
                           margin_std: float = 2.0) -> Any:
    """Spec section 2 vectorized over planes in plain PyTorch: keep mask (N, C, H, W) in
    y's dtype (1 keep, 0 drop). k is clamped into [1, L]."""
    import torch.nn.functional as F

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


def reference_layer(x: Any, y: Any, keep: Optional[Any], norm: str, distance: str, weight: float) -> Any:
    """Spec sections 3-4 for one layer, differentiable in x: (N,)."""
    import torch

    if keep is not None:
        y = y * keep
    if norm == "default":
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    elif norm == "shared":
        denom = y.pow(2).sum(1, keepdim=True).sqrt() + 1e-6
        x, y = x / denom, y / denom
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


def reference_head(xs: Sequence[Any], ys: Sequence[Any], *, wl: HeadWorkload) -> Any:
    """The whole head in plain PyTorch: (N,) loss averaged over the workload's layers."""
    import torch

    total = None
    for i, x, y in zip(wl.layers, xs, ys):
        keep = None
        if wl.masked(i):
            with torch.no_grad():
                keep = reference_outlier_keep(y, *outlier_windows(OUTLIER_DOWN_FACTOR[i]))
        loss = reference_layer(x, y, keep, wl.norm, wl.distance, layer_weight(i, wl.pow_law))
        total = loss if total is None else total + loss
    return total / len(xs)


def lpl_ext_head(xs: Sequence[Any], ys: Sequence[Any], *, wl: HeadWorkload) -> Any:
    """The same head with lpl_ext's kernels (outlier_mask + fused feature_distance)."""
    import lpl_ext

    total = None
    for i, x, y in zip(wl.layers, xs, ys):
        mask = None
        if wl.masked(i):
            closing, opening = outlier_windows(OUTLIER_DOWN_FACTOR[i])
            mask = lpl_ext.outlier_mask(y, closing=closing, opening=opening)
        loss = lpl_ext.feature_distance(x, y, mask, norm=wl.norm, distance=wl.distance,
                                        weight=layer_weight(i, wl.pow_law))
        total = loss if total is None else total + loss
    return total / len(xs)


def missing_piece(variant: str, wl: HeadWorkload) -> Optional[str]:
    """Why a variant cannot run this workload here, or None."""
    if variant != "lpl_ext":
        return None
    try:
        import lpl_ext
    except Exception as exc:  # noqa: BLE001
        return f"lpl_ext not importable ({type(exc).__name__}: {exc})"
    if not hasattr(lpl_ext, "feature_distance"):
        return "lpl_ext.feature_distance not available"
    if any(wl.masked(i) for i in wl.layers) and not hasattr(lpl_ext, "outlier_mask"):
        return "lpl_ext.outlier_mask not available"
    return None


# ---------------------------------------------------------------------------- worker

def make_inputs(wl: HeadWorkload, device: str, seed: int = 0) -> Tuple[List[Any], List[Any]]:
    """Prediction features x (leaves requiring grad) and target features y per layer:
    y standard normal with sparse 8x spikes (so the outlier mask has work), x = y + 0.1
    noise."""
    import torch

    dtype = getattr(torch, wl.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, ys = [], []
    for s in wl.shapes():
        y = torch.randn(s, generator=gen, device=device, dtype=dtype)
        y.view(-1)[:: 997] *= 8.0
        x = y + 0.1 * torch.randn(s, generator=gen, device=device, dtype=dtype)
        xs.append(x.requires_grad_(True))
        ys.append(y)
    return xs, ys


def build_callable(variant: str, wl: HeadWorkload) -> Callable[[Sequence[Any], Sequence[Any]], Any]:
    if variant == "eager":
        return functools.partial(reference_head, wl=wl)
    if variant == "compile":
        import torch

        head = functools.partial(reference_head, wl=wl)

        def compiled_head(xs: Sequence[Any], ys: Sequence[Any]) -> Any:
            return head(xs, ys)

        return torch.compile(compiled_head, dynamic=False)
    if variant == "lpl_ext":
        return functools.partial(lpl_ext_head, wl=wl)
    raise ValueError(f"variant: unknown {variant!r}")


def measure(variant: str, wl: HeadWorkload, device: str, env: Dict[str, Any], bandwidth: Optional[float],
            reps: int, budget_s: float) -> Dict[str, Any]:
    """Time and peak extra memory of fwd + bwd of one variant on one workload."""
    import torch

    row = common.base_row(env, BENCH, wl.name, variant)
    row.update(shape=wl.shape_text(), dtype=wl.dtype, values_per_side=wl.values_per_side())
    why = missing_piece(variant, wl)
    if why:
        row.update(status="skipped", note=why)
        return row
    xs, ys = make_inputs(wl, device)
    fn = build_callable(variant, wl)

    def drop_grads() -> None:
        for x in xs:
            x.grad = None

    def step() -> None:
        fn(xs, ys).sum().backward()

    mem = common.PeakMemory(device)
    try:
        timing = common.time_call(step, device, reps=reps, budget_s=budget_s, between=drop_grads,
                                  on_measure_start=lambda: (drop_grads(), mem.start()))
    except NotImplementedError as exc:
        row.update(status="skipped", note=f"not implemented: {exc}")
        return row
    extra = mem.stop()
    common.fill_measurement(row, timing, extra, wl.feature_bytes(), wl.floor_bytes(), bandwidth)
    if mem.approximate:
        row["note"] = "peak RSS approximate (ru_maxrss)"
    del xs, ys, fn
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def worker(args: argparse.Namespace) -> int:
    env = common.env_info(args.device)

    def measure_one(variant: str, wl: Any) -> Dict[str, Any]:
        return measure(variant, wl, args.device, env, args.bandwidth, args.reps, args.budget)

    return common.worker_rows(BENCH, workloads(args.mode, args.device), args.workloads.split(","), args.variant,
                              env, measure_one)


# ---------------------------------------------------------------------------- parent

def run(mode: str, device: str, variants: Sequence[str], bandwidth: Optional[float], env: Dict[str, Any],
        reps: int = 7, budget_s: float = 8.0, log: Callable[[str], None] = print,
        inprocess: bool = False, name_filter: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every variant over the mode's grid (names matching ``name_filter``, a regular
    expression), one fresh worker process per variant."""
    args = ["--mode", mode, "--device", device, "--reps", str(reps), "--budget", str(budget_s)]
    if bandwidth:
        args += ["--bandwidth", repr(bandwidth)]

    def measure_one(variant: str, wl: Any) -> Dict[str, Any]:
        return measure(variant, wl, device, env, bandwidth, reps, budget_s)

    return common.run_grid(BENCH, "benchmarks.bench_head", workloads(mode, device), name_filter, variants, env, args,
                           inprocess, measure_one, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="micro shapes, for smoke runs")
    p.add_argument("--variants", default=None, help=f"comma list of {VARIANTS}")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed calls per row (min 3 calls)")
    p.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth in bytes/s (measured if unset)")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workloads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "full")
    variants = common.parse_list(args.variants, VARIANTS, "variants")
    env = common.env_info(args.device)
    bw = args.bandwidth or common.copy_bandwidth(args.device)
    rows = run(mode, args.device, variants, bw, env, args.reps, args.budget)
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
