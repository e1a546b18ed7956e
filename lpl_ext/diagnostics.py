"""``python -m lpl_ext`` (or ``lpl-ext``): what to paste into a bug report.

Prints the version and build, the torch and NumPy versions, which CUDA paths exist
(driver, GPUs, shipped cubins, NVRTC, the kernel cache), and runs one tiny
feature-distance and outlier-mask call on every device it finds, checked against a plain
formulation on the CPU and, for a GPU, against the CPU kernels. Exits 1 when a device it
finds cannot run the kernels (or gives other results), 0 otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

import numpy as np


def _check_cpu() -> str:
    """feature_distance (norm none, mse) against numpy, on a numpy array; outlier_mask
    drops a planted blob of extreme values (as VAE decoder features show)."""
    from . import feature_distance, outlier_mask

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 9))
    y = rng.standard_normal((2, 3, 8, 9))
    got = feature_distance(x, y, norm="none", distance="mse", weight=1.0)
    want = ((x - y) ** 2).mean(axis=(2, 3)).mean(axis=1)
    if not np.allclose(got, want, rtol=1e-12, atol=0):
        raise AssertionError(f"feature_distance: {got} != {want}")
    plane = rng.standard_normal((1, 1, 40, 40)).astype(np.float32)
    plane[0, 0, 10:15, 20:25] = 50.0
    keep = outlier_mask(plane)
    if keep[0, 0, 12, 22] or keep.mean() < 0.9:
        raise AssertionError(f"outlier_mask: blob kept={bool(keep[0, 0, 12, 22])}, kept share {keep.mean():.3f}")
    return "feature_distance matches numpy, outlier_mask drops a planted blob"


def _check_cuda(index: int) -> str:
    """Loss, gradient and mask on cuda:<index> against the CPU kernels."""
    import torch

    from . import _cuda, feature_distance, outlier_mask

    _, origin = _cuda.load_kernels(index)
    dev = torch.device("cuda", index)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 16, 17, generator=g)
    x = (y + 0.3 * torch.randn(y.shape, generator=g)).requires_grad_(True)
    xc = x.detach().to(dev).requires_grad_(True)
    mask = outlier_mask(y)
    mask_c = outlier_mask(y.to(dev))
    if not torch.equal(mask_c.cpu(), mask):
        raise AssertionError("outlier_mask: the GPU's mask differs from the CPU's")
    loss = feature_distance(x, y, mask, norm="shared")
    loss_c = feature_distance(xc, y.to(dev), mask_c, norm="shared")
    loss.sum().backward()
    loss_c.sum().backward()
    torch.cuda.synchronize(dev)
    if not torch.allclose(loss_c.cpu(), loss, rtol=1e-5, atol=1e-7) or not torch.allclose(
            xc.grad.cpu(), x.grad, rtol=1e-5, atol=1e-9):
        raise AssertionError(f"feature_distance: GPU {loss_c.tolist()} vs CPU {loss.tolist()}")
    return f"{torch.cuda.get_device_name(dev)}: kernels from {origin}; loss, gradient and mask match the CPU"


def report(out: TextIO = sys.stdout, checks: Optional[Sequence[Tuple[str, Callable[[], str]]]] = None) -> int:
    """Writes the diagnostics to ``out``; returns the exit status."""
    from . import __version__, _cuda, build_info

    def line(text: str = "") -> None:
        out.write(text + "\n")

    info = build_info()
    line(f"lpl_ext {__version__} (revision {info.get('revision')}) at {os.path.dirname(os.path.abspath(__file__))}")
    line(f"python {platform.python_version()} on {platform.platform()}, numpy {np.__version__}")
    try:
        import torch

        line(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPUs visible to torch: "
             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        line("torch: not installed (numpy arrays only)")
        gpus = 0
    line(f"build: compiler {info.get('compiler')}, OpenMP {info.get('openmp')} ({info.get('omp_max_threads')} threads), "
         f"sanitize {info.get('sanitize')}")
    archs = ", ".join("sm_" + a for a in info["cuda_cubin_archs"]) or "none"
    line(f"CUDA kernels: shipped cubins {archs} (nvcc {info['cuda_cubin_toolkit']}); kernel sources "
         f"{'installed' if info['cuda_kernel_sources'] else 'missing'}")
    line(f"NVRTC: {info['nvrtc']} at {info['nvrtc_path']}" if info["nvrtc"] else "NVRTC: not found")
    cache = _cuda.cache_dir()
    cached = len(list(cache.glob("lpl_kernels-*"))) if cache.is_dir() else 0
    writable = os.access(cache if cache.is_dir() else cache.parent if cache.parent.is_dir() else os.path.expanduser("~"),
                         os.W_OK)
    line(f"kernel cache: {cache} ({cached} images, {'writable' if writable else 'NOT writable'})")
    if gpus:
        driver = info.get("cuda_driver")
        line(f"CUDA driver: {driver}" if driver else f"CUDA driver: unusable ({info.get('cuda_driver_error')})")
    line(f"build_info: {json.dumps(info, sort_keys=True)}")
    line()
    if checks is None:
        checks = [("cpu", _check_cpu)] + [(f"cuda:{i}", (lambda i=i: _check_cuda(i))) for i in range(gpus)]
    failed: List[str] = []
    for name, check in checks:
        try:
            line(f"check {name}: ok: {check()}")
        except Exception as exc:  # every failure is reported, and the others still run
            failed.append(name)
            line(f"check {name}: FAILED: {type(exc).__name__}: {exc}")
            if os.environ.get("LPL_EXT_DIAGNOSTICS_TRACEBACK"):
                line(traceback.format_exc())
    line()
    line(f"result: FAILED on {', '.join(failed)}" if failed else "result: ok")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args:
        print(f"lpl_ext diagnostics take no arguments, got {' '.join(args)!r} (try --help)", file=sys.stderr)
        return 2
    return report()


if __name__ == "__main__":
    sys.exit(main())
