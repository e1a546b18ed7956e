"""Quick side-by-side timing of lpl_ext.outlier_mask against the plain-PyTorch
formulation of LPL_SPEC.md section 2 (vectorized: kthvalue on the flattened planes,
std, two max_pool2d), on one layer, in one process, alternating the two so that both
see the same machine load. Also checks that the two masks are identical.

    python benchmarks/bench_outlier_quick.py [--shape 1 128 512 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lpl_ext  # noqa: E402


def torch_outlier_mask(y: torch.Tensor, quantile: float = 0.02, margin_std: float = 2.0, closing: int = 3,
                       opening: int = 5) -> torch.Tensor:
    """The reference's vectorized formulation (k clamped into [1, L]); y finite."""
    n, c, h, w = y.shape
    length = h * w
    flat = y.reshape(n * c, length)
    k1 = min(max(int(math.floor(length * quantile)), 1), length)
    k2 = min(max(int(math.floor(length * (1 - quantile))), 1), length)
    q1 = flat.kthvalue(k1, dim=1).values[:, None]
    q2 = flat.kthvalue(k2, dim=1).values[:, None]
    m = margin_std * flat.std(dim=1)[:, None]
    keep = ((q1 - m < flat) & (flat < q2 + m)).view(n, c, h, w).float()
    keep = F.max_pool2d(keep, closing, stride=1, padding=(closing - 1) // 2)
    keep = -F.max_pool2d(-keep, opening, stride=1, padding=(opening - 1) // 2)
    return keep.bool()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=4, default=[1, 128, 512, 512])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    # heavy-tailed, decoder-like features: Student-t(3) scaled per channel
    y = torch.distributions.StudentT(3.0).sample(args.shape) * torch.rand(1, args.shape[1], 1, 1) * 3
    y = y.to(getattr(torch, args.dtype))
    t_ref, t_ext = [], []
    same = True
    for _ in range(args.reps):
        t0 = time.perf_counter()
        ref = torch_outlier_mask(y)
        t1 = time.perf_counter()
        ext = lpl_ext.outlier_mask(y)
        t2 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_ext.append(t2 - t1)
        same &= bool(torch.equal(ref, ext))
    r, e = statistics.median(t_ref), statistics.median(t_ext)
    print(f"shape {tuple(args.shape)} {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"lpl_ext omp threads {lpl_ext.build_info()['omp_max_threads']}")
    print(f"torch formulation: median {r * 1e3:.1f} ms  (all: {', '.join(f'{t * 1e3:.0f}' for t in t_ref)})")
    print(f"lpl_ext.outlier_mask: median {e * 1e3:.1f} ms  (all: {', '.join(f'{t * 1e3:.0f}' for t in t_ext)})")
    print(f"speedup {r / e:.1f}x, masks identical: {same}")


if __name__ == "__main__":
    main()
