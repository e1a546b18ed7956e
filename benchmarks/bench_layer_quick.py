"""Quick side-by-side timing of one fused lpl_ext.feature_distance layer (forward +
backward) against the plain-PyTorch eager formulation of LPL_SPEC.md sections 3-4
(benchmarks.bench_head.reference_layer), in one process, alternating the two so that
both see the same machine load. Also checks that the two agree (loss and x.grad).

    python benchmarks/bench_layer_quick.py [--shape 2 256 256 256] [--norm shared] [--mask] [--reps 3]

The full suite (every option set, torch.compile, memory, floors) is benchmarks/run_all.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lpl_ext  # noqa: E402
from benchmarks.bench_head import reference_layer  # noqa: E402


def fwd_bwd(fn, x: torch.Tensor, grad_out: torch.Tensor):
    """(seconds, loss, x.grad) of fn(x) followed by backward of (loss * grad_out).sum()."""
    xr = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    loss = fn(xr)
    (loss * grad_out).sum().backward()
    return time.perf_counter() - t0, loss.detach(), xr.grad


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=4, default=[2, 256, 256, 256], metavar=("N", "C", "H", "W"))
    ap.add_argument("--norm", default="shared", choices=["default", "shared", "batch", "none"])
    ap.add_argument("--distance", default="mse", choices=["mse", "l1"])
    ap.add_argument("--mask", action="store_true", help="with lpl_ext.outlier_mask(y) as keep-mask")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.shape)
    y = 0.7 * x + 0.5 * torch.randn(args.shape)
    keep = lpl_ext.outlier_mask(y) if args.mask else None
    keep_f = keep.float() if keep is not None else None
    grad_out = torch.linspace(0.5, 1.5, args.shape[0])

    def eager(xr):
        return reference_layer(xr, y, keep_f, args.norm, args.distance, 1.0)

    def fused(xr):
        return lpl_ext.feature_distance(xr, y, keep, norm=args.norm, distance=args.distance)

    t_ref: List[float] = []
    t_ext: List[float] = []
    for _ in range(args.reps + 1):  # the first round is a warm-up
        tr, loss_r, grad_r = fwd_bwd(eager, x, grad_out)
        te, loss_e, grad_e = fwd_bwd(fused, x, grad_out)
        t_ref.append(tr)
        t_ext.append(te)
    r, e = statistics.median(t_ref[1:]), statistics.median(t_ext[1:])
    loss_err = ((loss_e - loss_r).abs() / loss_r.abs().clamp_min(1e-30)).max().item()
    grad_err = ((grad_e - grad_r).abs().max() / grad_r.abs().max().clamp_min(1e-30)).item()
    print(f"shape {tuple(args.shape)} float32, norm {args.norm}, {args.distance}, mask {args.mask}; "
          f"torch threads {torch.get_num_threads()}, lpl_ext omp threads {lpl_ext.build_info()['omp_max_threads']}")
    print(f"eager formulation, fwd+bwd: median {r * 1e3:.1f} ms  (all: {', '.join(f'{t * 1e3:.0f}' for t in t_ref[1:])})")
    print(f"lpl_ext.feature_distance, fwd+bwd: median {e * 1e3:.1f} ms  "
          f"(all: {', '.join(f'{t * 1e3:.0f}' for t in t_ext[1:])})")
    print(f"speedup {r / e:.1f}x; max rel. difference: loss {loss_err:.1e}, grad {grad_err:.1e} (of max |grad|)")


if __name__ == "__main__":
    main()
