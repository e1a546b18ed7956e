"""Global-memory bytes the CUDA kernels move, counted on the emulated device (docs/cuda.md,
"The emulated device"), per op and layer of the SDXL decoder pyramid at a reduced size,
against the minimal bytes:

- feature distance: read x, y and the keep-mask once, write the gradient once;
- outlier mask: read y once, write the mask once.

On masked layers the feature distance is counted as the loss module runs it: with the
plane moments the outlier mask returned with its mask (docs/spec.md, "Feature distance"),
so the current kernels skip their statistics pass (y read once); the 0.2 kernels compute
no moments (their rows run without them, as the loss module does there). The outlier mask
row of a masked layer includes writing those moments (24 bytes per plane).

Both kernel sets are counted (LPL_EXT_KERNEL_SET, docs/cuda.md "Switches"): ``v2``, the
current kernels, and ``v1``, the 0.2 kernels kept until a GPU run has compared the two:
the v1 rows are the "before" of the table, the v2 rows the "after".

Emulated traffic, not DRAM measurements: *requested* counts every load and store of every
thread through the kernels' io helpers (lpl_device.cuh), as if nothing were cached or
coalesced; *distinct* counts each byte once per launch (what a launch must move if every
re-read hits a cache), summed over the op's launches. A GPU's DRAM traffic lies between
the two. Global atomics count once per operation.

    python benchmarks/run_all.py --only emulated_bytes [--res 32] [--json FILE]
    python benchmarks/bench_emulated_bytes.py [--res 32] [--kernel-sets v2,v1] [--json FILE]
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import bench_head, common

ref = common.tests_module("reference")

NORMS = tuple(ref.NORMS)
KERNEL_SETS = ("v2", "v1")
DTYPES = ("float32", "bfloat16")
ELEM = bench_head.ELEM_SIZE
Row = Dict[str, Any]


def _device(kernel_set: str = "v2") -> Tuple[Any, Any]:
    """(tests/test_cuda_emulated.py, its Emu): the emulated device's helpers, the stand-in
    driver built and the kernels of `kernel_set` loaded, counting distinct bytes too."""
    build = common.tests_module("fake_cuda.build")
    lib = build.build(Path(os.environ.get("LPL_EMU_BUILD_DIR") or Path(tempfile.gettempdir()) / "lpl_fake_cuda"))
    log_dir = tempfile.mkdtemp(prefix="lpl_emulated_bytes.")
    atexit.register(shutil.rmtree, log_dir, ignore_errors=True)
    log = Path(log_dir) / "launches.log"
    os.environ.update(LPL_EXT_LIBCUDA=str(lib), FAKE_CUDA_LOG=str(log), FAKE_CUDA_FOOTPRINT="1", FAKE_CUDA_SEED="1")
    for var in ("FAKE_CUDA_CC", "FAKE_CUDA_SMS", "FAKE_CUDA_DEVICES"):
        os.environ.pop(var, None)
    emulated = common.tests_module("test_cuda_emulated")
    from lpl_ext import _C, _cuda

    image, origin = emulated._image_for_emulation()
    code = _cuda.KERNEL_SETS[kernel_set]
    kernels = (_C.cuda_load_kernels(_cuda.driver(), 0, image, code) if image
               else _cuda.load_kernels(0, kernel_set)[0])
    dev = emulated.Emu(lib, log, kernels, kernels, origin or "lpl_ext's image choice")
    dev.kernel_set = kernel_set
    return emulated, dev


def _totals(dev: Any) -> Row:
    """Sums over the launches since the last clear, and their count."""
    launches = dev.launches()
    bad = [ln for ln in launches if ln["kind"] != "launch" or ln.get("rc") != "0"]
    if bad or dev.warnings():
        raise RuntimeError(f"emulated launches failed or warned: {bad or dev.warnings()}")
    keys = ("read", "write", "atomic", "unique_read", "unique_write")
    out = {k: sum(int(ln[k]) for ln in launches) for k in keys}
    out["launches"] = len(launches)
    return out


def _row(kernels: str, op: str, layer: str, shape: Sequence[int], dtype: str, norm: str, masked: bool,
         totals: Row, minimal_per_elem: float, wall_s: float, moments: bool = False) -> Row:
    elems = 1
    for d in shape:
        elems *= d
    requested = (totals["read"] + totals["write"] + totals["atomic"]) / elems
    distinct = (totals["unique_read"] + totals["unique_write"]) / elems
    return dict(kernels=kernels, op=op, layer=layer, shape="x".join(map(str, shape)), dtype=dtype, norm=norm, mask=masked,
                plane_moments=moments,
                read_per_elem=totals["read"] / elems, write_per_elem=totals["write"] / elems,
                atomic_per_elem=totals["atomic"] / elems, requested_per_elem=requested, distinct_per_elem=distinct,
                minimal_per_elem=minimal_per_elem, requested_over_minimal=requested / minimal_per_elem,
                distinct_over_minimal=distinct / minimal_per_elem, launches=totals["launches"],
                emulation_s=round(wall_s, 2))


def run(res: int = 32, dtypes: Sequence[str] = DTYPES, norms: Sequence[str] = NORMS,
        log: Callable[[str], None] = print, kernel_sets: Sequence[str] = KERNEL_SETS) -> List[Row]:
    """One row per (kernel set, op, layer, dtype[, norm]) of the pyramid at `res` px
    (latent res/8), on the same inputs for every kernel set."""
    import torch

    rows: List[Row] = []
    for kernel_set in kernel_sets:
        emulated, dev = _device(kernel_set)
        lat = res // 8
        g = torch.Generator().manual_seed(0)
        for i, name in enumerate(bench_head.LAYER_NAMES):
            shape = (1, bench_head.LAYER_CHANNELS[i], lat * bench_head.LAYER_SCALE[i],
                     lat * bench_head.LAYER_SCALE[i])
            masked = i in ref.OUTLIER_DOWN_FACTOR  # the layers the loss masks (docs/spec.md, "Loss module")
            closing, opening = ref.outlier_windows(ref.OUTLIER_DOWN_FACTOR.get(i, 1))
            for dtype in dtypes:
                tdt = getattr(torch, dtype)
                y = torch.randn(shape, generator=g).to(tdt)
                x = (y.float() + 0.1 * torch.randn(shape, generator=g)).to(tdt)
                dev.clear()
                t = time.time()
                # the loss module's call: the plane moments with the mask where they pay off
                with_moments = masked and kernel_set != "v1"
                keep, _, *moments = emulated.emu_outlier_mask(dev, y, closing, opening, moments=with_moments)
                rows.append(_row(kernel_set, "outlier_mask", name, shape, dtype, "", False, _totals(dev),
                                 ELEM[dtype] + 1, time.time() - t, with_moments))
                log(_line(rows[-1]))
                mask = torch.from_numpy(keep.view(bool).copy()) if masked else None
                for norm in norms:
                    dev.clear()
                    t = time.time()
                    emulated.emu_feature_distance(dev, x, y, mask, norm, "mse", 1.0,
                                                  plane_moments=moments[0] if moments else None)
                    minimal = 2 * ELEM[dtype] + (1 if masked else 0) + ELEM[dtype]
                    rows.append(_row(kernel_set, "feature_distance", name, shape, dtype, norm, masked,
                                     _totals(dev), minimal, time.time() - t, with_moments))
                    log(_line(rows[-1]))
        del dev  # the kernels capsule (its module) before the next set's
    return rows


#: Outlier planes too large for v2's one-block path (its streaming path): the pyramid's
#: 256x256 level at 1024 px (two planes) and one plane of its 1024x1024 level.
STREAMING_SHAPES = ((1, 2, 256, 256), (1, 1, 1024, 1024))
STREAMING_DTYPES = ("float32", "bfloat16", "float64")


def run_streaming(kernel_sets: Sequence[str] = KERNEL_SETS, shapes: Sequence[Tuple[int, ...]] = STREAMING_SHAPES,
                  dtypes: Sequence[str] = STREAMING_DTYPES, log: Callable[[str], None] = print) -> List[Row]:
    """One outlier-mask row per (kernel set, plane shape, dtype) on streaming-path planes of
    spread-out values (standard normal), closing 3, opening 5 (the 1024 px levels' windows)."""
    import torch

    rows: List[Row] = []
    for kernel_set in kernel_sets:
        emulated, dev = _device(kernel_set)
        for shape in shapes:
            for dtype in dtypes:
                y = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                y = y.to(getattr(torch, dtype))
                dev.clear()
                t = time.time()
                emulated.emu_outlier_mask(dev, y, 3, 5)
                rows.append(_row(kernel_set, "outlier_mask", "streaming", shape, dtype, "", False, _totals(dev),
                                 ELEM[dtype] + 1, time.time() - t))
                log(_line(rows[-1]))
        del dev
    return rows


#: Unmasked feature-distance planes of the size the 1024 px pyramid's unmasked layers have
#: (mid: 128x128; four of its 512 channels), where per-plane partials are a negligible share,
#: unlike on the 4x4 and 8x8 planes of the 32 px pyramid above.
LARGE_PLANE_SHAPES = ((1, 4, 128, 128),)


def run_large_planes(kernel_sets: Sequence[str] = KERNEL_SETS,
                     shapes: Sequence[Tuple[int, ...]] = LARGE_PLANE_SHAPES, dtypes: Sequence[str] = DTYPES,
                     norms: Sequence[str] = NORMS, log: Callable[[str], None] = print) -> List[Row]:
    """One unmasked feature-distance row per (kernel set, shape, dtype, norm) on planes of the
    1024 px pyramid's unmasked layers' size (no outlier mask, so no plane moments: `batch`
    runs its own statistics pass)."""
    import torch

    rows: List[Row] = []
    for kernel_set in kernel_sets:
        emulated, dev = _device(kernel_set)
        for shape in shapes:
            g = torch.Generator().manual_seed(0)
            for dtype in dtypes:
                tdt = getattr(torch, dtype)
                y = torch.randn(shape, generator=g).to(tdt)
                x = (y.float() + 0.1 * torch.randn(shape, generator=g)).to(tdt)
                for norm in norms:
                    dev.clear()
                    t = time.time()
                    emulated.emu_feature_distance(dev, x, y, None, norm, "mse", 1.0)
                    rows.append(_row(kernel_set, "feature_distance", "large", shape, dtype, norm, False,
                                     _totals(dev), 3 * ELEM[dtype], time.time() - t))
                    log(_line(rows[-1]))
        del dev
    return rows


def _plane_table(rows: List[Row], norm_column: bool) -> str:
    """Markdown: rows of one op on large planes (the streaming outlier mask: no norm column;
    the large-plane feature distance: the norm after the dtype), labelled as emulated traffic."""
    first = "| kernels | op | shape | dtype | norm" if norm_column else "| kernels | op | plane | dtype"
    out = [first + " | requested B/elem | distinct B/elem | minimal | requested / minimal | launches |",
           "|---|---|---|---|" + ("---|" if norm_column else "") + "---:|---:|---:|---:|---:|"]
    for r in rows:
        norm = f" | {r['norm']}" if norm_column else ""
        out.append(f"| {r['kernels']} | {r['op']} | {r['shape']} | {r['dtype']}{norm} | {r['requested_per_elem']:.2f}"
                   f" | {r['distinct_per_elem']:.2f} | {r['minimal_per_elem']:.0f}"
                   f" | {r['requested_over_minimal']:.2f}× | {r['launches']} |")
    return "\n".join(out)


def large_plane_table(rows: List[Row]) -> str:
    """Markdown: the large-plane feature-distance rows, labelled as emulated traffic."""
    return _plane_table(rows, norm_column=True)


def streaming_table(rows: List[Row]) -> str:
    """Markdown: the streaming-path rows, labelled as emulated traffic."""
    return _plane_table(rows, norm_column=False)


def summary_table(rows: List[Row]) -> str:
    """Markdown: per (op, dtype, norm), the range over the pyramid's layers of requested /
    minimal bytes, one column per kernel set."""
    sets = [k for k in KERNEL_SETS if any(r["kernels"] == k for r in rows)]
    keys = sorted({(r["op"], r["dtype"], r["norm"]) for r in rows})
    names = {"v1": "v1 (0.2 kernels)", "v2": "v2 (current)"}
    out = ["| op | dtype | norm | " + " | ".join(f"{names[k]}: requested / minimal" for k in sets) + " |",
           "|---|---|---|" + "---:|" * len(sets)]
    for op, dtype, norm in keys:
        cells = []
        for k in sets:
            vals = [r["requested_over_minimal"] for r in rows if (r["kernels"], r["op"], r["dtype"], r["norm"])
                    == (k, op, dtype, norm)]
            cells.append(f"{min(vals):.2f}–{max(vals):.2f}×" if vals else "–")
        out.append(f"| {op} | {dtype} | {norm or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _line(r: Row) -> str:
    return (f"[emulated bytes] {r['kernels']} {r['op']} {r['layer']} {r['shape']} {r['dtype']} {r['norm'] or '-'}"
            f"{' mask' if r['mask'] else ''}{' +moments' if r.get('plane_moments') else ''}: requested"
            f" {r['requested_per_elem']:.2f} B/elem, distinct "
            f"{r['distinct_per_elem']:.2f}, minimal {r['minimal_per_elem']:.0f} ({r['emulation_s']:.1f} s)")


def _mask_label(r: Row) -> str:
    """The table's mask column: whether the op reads a mask, and whether the plane moments
    go with it (written by the outlier mask, read by the feature distance)."""
    if r["mask"]:
        return "yes, moments" if r.get("plane_moments") else "yes"
    return "moments" if r.get("plane_moments") else "no"


def table(rows: List[Row], res: int) -> str:
    """Markdown: the rows, labelled as emulated traffic."""
    out = [
        f"Emulated global-memory traffic (not DRAM measurements), SDXL decoder pyramid at {res}px"
        f" (latent {res // 8}x{res // 8}), batch 1; bytes per element of the op's tensor."
        " *requested*: every load and store of every thread (no caching, no coalescing);"
        " *distinct*: each byte once per launch, summed over the launches; *minimal*: feature distance"
        " reads x, y (and the 1-byte mask on masked layers) and writes the gradient once, the outlier"
        " mask reads y and writes the mask once.",
        "",
        "*kernels*: v2 the current kernels (after), v1 the 0.2 kernels (before; LPL_EXT_KERNEL_SET=v1)."
        " *mask* \"yes, moments\": the feature distance takes the outlier mask's plane moments (no"
        " statistics pass), and the outlier mask writes them.",
        "",
        "| kernels | op | layer | shape | dtype | norm | mask | requested B/elem (read + write + atomic)"
        " | distinct B/elem | minimal B/elem | requested / minimal | distinct / minimal | launches |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['kernels']} | {r['op']} | {r['layer']} | {r['shape']} | {r['dtype']} | {r['norm'] or '–'}"
            f" | {_mask_label(r)}"
            f" | {r['requested_per_elem']:.2f} ({r['read_per_elem']:.2f} + {r['write_per_elem']:.2f}"
            f" + {r['atomic_per_elem']:.3f}) | {r['distinct_per_elem']:.2f} | {r['minimal_per_elem']:.0f}"
            f" | {r['requested_over_minimal']:.2f}× | {r['distinct_over_minimal']:.2f}× | {r['launches']} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--kernel-sets", default=",".join(KERNEL_SETS),
                   help=f"comma-separated kernel sets to count (default {','.join(KERNEL_SETS)})")
    args = p.parse_args(argv)
    sets = [k.strip() for k in args.kernel_sets.split(",") if k.strip()]
    bad = [k for k in sets if k not in KERNEL_SETS]
    if bad or not sets:
        p.error(f"--kernel-sets: expected a subset of {','.join(KERNEL_SETS)}, got {args.kernel_sets!r}")
    rows = run(args.res, kernel_sets=sets)
    streaming = run_streaming(sets)
    large = run_large_planes(sets)
    print(summary_table(rows), streaming_table(streaming), large_plane_table(large), table(rows, args.res),
          sep="\n\n")
    rows += streaming + large
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
