"""Outlier mask alone (LPL_SPEC.md section 2) on SDXL target features: plain-PyTorch
eager reference (kthvalue, std, max_pool2d, vectorized over planes) vs torch.compile of
it vs ``lpl_ext.outlier_mask``. Forward only (the mask has no gradient).

    python -m benchmarks.bench_outlier [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.bench_head import (
    LAYER_CHANNELS, LAYER_NAMES, LAYER_SCALE, OUTLIER_DOWN_FACTOR, outlier_windows, reference_outlier_keep,
)

BENCH = "outlier"
VARIANTS = ("eager", "compile", "lpl_ext")


@dataclass(frozen=True)
class OutlierWorkload:
    """One masked pyramid level at a resolution and batch."""

    resolution: int
    batch: int
    layer: int
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"{self.resolution}px_b{self.batch}_{LAYER_NAMES[self.layer]}"

    @property
    def windows(self) -> Tuple[int, int]:
        return outlier_windows(OUTLIER_DOWN_FACTOR[self.layer])

    def shape(self) -> Tuple[int, int, int, int]:
        side = self.resolution // 8 * LAYER_SCALE[self.layer]
        return (self.batch, LAYER_CHANNELS[self.layer], side, side)

    def values(self) -> int:
        return math.prod(self.shape())

    def feature_bytes(self) -> int:
        """Bytes of the target feature tensor."""
        return self.values() * {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}[self.dtype]

    def floor_bytes(self) -> int:
        """Read y once, write a 1-byte mask."""
        return self.feature_bytes() + self.values()

    def shape_text(self) -> str:
        c, o = self.windows
        return "x".join(map(str, self.shape())) + f" closing {c} opening {o}"


def workloads(mode: str, device: str = "cpu") -> List[OutlierWorkload]:
    if mode == "quick":
        return [OutlierWorkload(32, 2, 3)]
    if mode == "gpu" or device.startswith("cuda"):
        return [OutlierWorkload(1024, 4, i) for i in (2, 3, 4)]
    return [OutlierWorkload(512, 1, 2), OutlierWorkload(512, 1, 3), OutlierWorkload(1024, 1, 4)]


def missing_piece(variant: str) -> Optional[str]:
    if variant != "lpl_ext":
        return None
    try:
        import lpl_ext
    except Exception as exc:  # noqa: BLE001
        return f"lpl_ext not importable ({type(exc).__name__}: {exc})"
    if not hasattr(lpl_ext, "outlier_mask"):
        return "lpl_ext.outlier_mask not available"
    return None


def build_callable(variant: str, wl: OutlierWorkload) -> Callable[[Any], Any]:
    closing, opening = wl.windows
    if variant == "eager":
        return lambda y: reference_outlier_keep(y, closing, opening)
    if variant == "compile":
        import torch

        def keep_of(y: Any) -> Any:
            return reference_outlier_keep(y, closing, opening)

        return torch.compile(keep_of, dynamic=False)
    if variant == "lpl_ext":
        import lpl_ext

        return lambda y: lpl_ext.outlier_mask(y, closing=closing, opening=opening)
    raise ValueError(f"variant: unknown {variant!r}")


def measure(variant: str, wl: OutlierWorkload, device: str, env: Dict[str, Any], bandwidth: Optional[float],
            reps: int, budget_s: float) -> Dict[str, Any]:
    import torch

    row = common.base_row(env, BENCH, wl.name, variant)
    row.update(shape=wl.shape_text(), dtype=wl.dtype, values_per_side=wl.values())
    why = missing_piece(variant)
    if why:
        row.update(status="skipped", note=why)
        return row
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(wl.shape(), generator=gen, device=device, dtype=getattr(torch, wl.dtype))
    y.view(-1)[:: 997] *= 8.0
    fn = build_callable(variant, wl)
    mem = common.PeakMemory(device)

    def step() -> None:
        with torch.no_grad():
            fn(y)

    try:
        timing = common.time_call(step, device, reps=reps, budget_s=budget_s, on_measure_start=mem.start)
    except NotImplementedError as exc:
        row.update(status="skipped", note=f"not implemented: {exc}")
        return row
    extra = mem.stop()
    common.fill_measurement(row, timing, extra, wl.feature_bytes(), wl.floor_bytes(), bandwidth)
    if mem.approximate:
        row["note"] = "peak RSS approximate (ru_maxrss)"
    del y, fn
    gc.collect()
    return row


def worker(args: argparse.Namespace) -> int:
    env = common.env_info(args.device)

    def measure_one(variant: str, wl: Any) -> Dict[str, Any]:
        return measure(variant, wl, args.device, env, args.bandwidth, args.reps, args.budget)

    return common.worker_rows(BENCH, workloads(args.mode, args.device), args.workloads.split(","), args.variant,
                              env, measure_one)


def run(mode: str, device: str, variants: Sequence[str], bandwidth: Optional[float], env: Dict[str, Any],
        reps: int = 7, budget_s: float = 5.0, log: Callable[[str], None] = print,
        inprocess: bool = False, name_filter: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every variant over the mode's grid (names matching ``name_filter``, a regular
    expression), one fresh worker process per variant."""
    args = ["--mode", mode, "--device", device, "--reps", str(reps), "--budget", str(budget_s)]
    if bandwidth:
        args += ["--bandwidth", repr(bandwidth)]

    def measure_one(variant: str, wl: Any) -> Dict[str, Any]:
        return measure(variant, wl, device, env, bandwidth, reps, budget_s)

    return common.run_grid(BENCH, "benchmarks.bench_outlier", workloads(mode, device), name_filter, variants, env, args,
                           inprocess, measure_one, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default=None)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--bandwidth", type=float, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workloads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "full")
    env = common.env_info(args.device)
    bw = args.bandwidth or common.copy_bandwidth(args.device)
    rows = run(mode, args.device, common.parse_list(args.variants, VARIANTS, "variants"), bw, env,
               args.reps, args.budget)
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
