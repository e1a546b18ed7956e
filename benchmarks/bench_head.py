"""The LPL loss head on SDXL decoder features: the CSV benches ``head`` (outlier mask of the
target, normalization, distance, per-plane reductions, layer weights, mean over layers;
forward + backward to the prediction features) and ``outlier`` (the outlier mask alone,
forward), and the one-layer comparisons of ``run_all.py --layer``.

Variants: **eager** (tests/reference.py's ``reference_head`` / ``reference_outlier_keep``:
the head as the reference writes it, vectorized over planes), **compile** (the same
function under ``torch.compile``, compiled by the warm-up call) and **lpl_ext**
(``lpl_ext.outlier_mask`` + fused ``lpl_ext.feature_distance``).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import common

ref = common.tests_module("reference")

VARIANTS = ("eager", "compile", "lpl_ext")
# SDXL decoder feature pyramid (docs/spec.md, "Loss module"): channels and upscale of each
# level relative to the latent (mid, up0, up1, up2, up3).
LAYER_CHANNELS = (512, 512, 512, 256, 128)
LAYER_SCALE = (1, 2, 4, 8, 8)
LAYER_NAMES = ("mid", "up0", "up1", "up2", "up3")
PYRAMID = tuple(range(5))
ELEM_SIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


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
        lay = "pyramid" if self.layers == PYRAMID else "+".join(LAYER_NAMES[i] for i in self.layers)
        return (f"{self.resolution}px_b{self.batch}_{lay}_{self.norm}_{self.distance}"
                f"_{'out' if self.outliers else 'noout'}")

    def shapes(self) -> List[Tuple[int, int, int, int]]:
        lat = self.resolution // 8
        return [(self.batch, LAYER_CHANNELS[i], lat * LAYER_SCALE[i], lat * LAYER_SCALE[i]) for i in self.layers]

    def masked(self, index: int) -> bool:
        return self.outliers and index in ref.OUTLIER_DOWN_FACTOR

    def values_per_side(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    def feature_bytes(self) -> int:
        """Bytes of the two feature tensors (prediction and target), all layers."""
        return 2 * self.values_per_side() * ELEM_SIZE[self.dtype]

    def floor_bytes(self) -> int:
        """Bytes a head must move at least: read x and y, write x.grad, and read a 1-byte
        keep mask on the masked layers."""
        return sum(math.prod(s) * (3 * ELEM_SIZE[self.dtype] + self.masked(i))
                   for i, s in zip(self.layers, self.shapes()))

    def shape_text(self) -> str:
        return " ".join("x".join(map(str, s[1:])) for s in self.shapes()) + f" (N={self.batch})"


@dataclass(frozen=True)
class OutlierWorkload(HeadWorkload):
    """The outlier mask alone on one masked level, ``layers == (level,)``."""

    @property
    def name(self) -> str:
        return f"{self.resolution}px_b{self.batch}_{LAYER_NAMES[self.layers[0]]}"

    @property
    def windows(self) -> Tuple[int, int]:
        return ref.outlier_windows(ref.OUTLIER_DOWN_FACTOR[self.layers[0]])

    def feature_bytes(self) -> int:
        """Bytes of the target feature tensor."""
        return self.values_per_side() * ELEM_SIZE[self.dtype]

    def floor_bytes(self) -> int:
        """Read y once, write a 1-byte mask."""
        return self.feature_bytes() + self.values_per_side()

    def shape_text(self) -> str:
        return "x".join(map(str, self.shapes()[0])) + " closing {} opening {}".format(*self.windows)


def workloads(bench: str, mode: str) -> List[HeadWorkload]:
    """The grid of a bench ('head' or 'outlier') in a run mode: 'quick' (micro shapes),
    'full' (CPU) or 'gpu'."""
    if bench == "outlier":
        if mode == "quick":
            return [OutlierWorkload(32, 2, (3,))]
        if mode == "gpu":
            return [OutlierWorkload(1024, 4, (i,)) for i in (2, 3, 4)]
        return [OutlierWorkload(512, 1, (2,)), OutlierWorkload(512, 1, (3,)), OutlierWorkload(1024, 1, (4,))]
    if mode == "quick":
        # latent 4x4: the smallest pyramid whose masked planes hold >= 50 values
        return [HeadWorkload(32, 2, PYRAMID, "shared", "mse", True), HeadWorkload(32, 2, PYRAMID, "default", "mse", False)]
    # GPU: 1024px batch 4. CPU: every option set on the 512px pyramid (batch 1: 579 MB per
    # side), the l1 distance once, and the largest 1024px level alone (1 GiB per side).
    res, batch = (1024, 4) if mode == "gpu" else (512, 1)
    grid = [HeadWorkload(res, batch, PYRAMID, n, "mse", o) for n in ref.NORMS for o in (False, True)]
    grid.append(HeadWorkload(res, batch, PYRAMID, "shared", "l1", True))
    if mode != "gpu":
        grid.append(HeadWorkload(1024, 1, (3,), "shared", "mse", True))
    return grid


# ---------------------------------------------------------------------------- variants

def make_inputs(wl: HeadWorkload, device: str, seed: int = 0, with_x: bool = True) -> Tuple[List[Any], List[Any]]:
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
        ys.append(y)
        if with_x:
            xs.append((y + 0.1 * torch.randn(s, generator=gen, device=device, dtype=dtype)).requires_grad_(True))
    return xs, ys


def lpl_ext_head(xs: Sequence[Any], ys: Sequence[Any], wl: HeadWorkload) -> Any:
    """The head with lpl_ext's kernels (outlier_mask + fused feature_distance): (N,)."""
    import lpl_ext

    total = None
    for i, x, y in zip(wl.layers, xs, ys):
        mask = None
        if wl.masked(i):
            closing, opening = ref.outlier_windows(ref.OUTLIER_DOWN_FACTOR[i])
            mask = lpl_ext.outlier_mask(y, closing=closing, opening=opening)
        loss = lpl_ext.feature_distance(x, y, mask, norm=wl.norm, distance=wl.distance,
                                        weight=ref.layer_weight(i, wl.pow_law))
        total = loss if total is None else total + loss
    return total / len(xs)


def build_callable(bench: str, variant: str, wl: HeadWorkload) -> Callable[..., Any]:
    """head: fn(xs, ys) -> (N,) loss; outlier: fn(y) -> keep mask."""
    if bench == "outlier":
        closing, opening = wl.windows
        if variant == "lpl_ext":
            import lpl_ext

            return functools.partial(lpl_ext.outlier_mask, closing=closing, opening=opening)
        fn = functools.partial(ref.reference_outlier_keep, closing=closing, opening=opening)
    elif variant == "lpl_ext":
        return functools.partial(lpl_ext_head, wl=wl)
    else:
        fn = functools.partial(ref.reference_head, layers=wl.layers, norm=wl.norm, distance=wl.distance,
                               outliers=wl.outliers, pow_law=wl.pow_law)
    if variant == "eager":
        return fn
    if variant == "compile":
        import torch

        def compiled(*args: Any) -> Any:
            return fn(*args)

        return torch.compile(compiled, dynamic=False)
    raise ValueError(f"variant: unknown {variant!r}")


def measure(bench: str, variant: str, workload: str, mode: str, device: str, env: Dict[str, Any],
            bandwidth: Optional[float], reps: int, budget: float) -> List[Dict[str, Any]]:
    """Worker side (common.run_grid): time and peak extra memory of one variant on one
    workload, one row."""
    wl = next(w for w in workloads(bench, mode) if w.name == workload)
    return measure_workload(bench, variant, wl, device, env, bandwidth, reps, budget)


def measure_workload(bench: str, variant: str, wl: HeadWorkload, device: str, env: Dict[str, Any],
                     bandwidth: Optional[float], reps: int, budget: float) -> List[Dict[str, Any]]:
    """:func:`measure` of a workload object (benchmarks/gpu_check.py calls it in process)."""
    workload = wl.name

    def row() -> Dict[str, Any]:
        import torch

        r = common.base_row(env, bench, wl.name, variant)
        r.update(shape=wl.shape_text(), dtype=wl.dtype, values_per_side=wl.values_per_side())
        why = common.missing("lpl_ext") if variant == "lpl_ext" else None
        if why:
            r.update(status="skipped", note=why)
            return r
        xs, ys = make_inputs(wl, device, with_x=bench == "head")
        fn = build_callable(bench, variant, wl)
        if bench == "outlier":
            def step() -> None:
                with torch.no_grad():
                    fn(ys[0])
            drop = None
        else:
            def step() -> None:
                fn(xs, ys).sum().backward()

            def drop() -> None:
                for x in xs:
                    x.grad = None
        return common.measure_row(r, step, device, reps, budget, drop, wl.feature_bytes(), wl.floor_bytes(),
                                  bandwidth)

    return [common.safe_row(env, bench, workload, variant, wl.shape_text(), row)]


# ---------------------------------------------------------------------------- one layer, in process

def compare_layer(bench: str, shape: Sequence[int], norm: str = "shared", distance: str = "mse",
                  mask: bool = False, dtype: str = "float32", reps: int = 3, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """One layer of the given (N, C, H, W) shape, eager formulation vs lpl_ext, alternated in
    this process (common.time_interleaved) so that both see the same machine load; also
    checks that the two agree. head: feature_distance forward + backward (y = 0.7 x + 0.5
    noise; ``mask``: with lpl_ext.outlier_mask(y) as keep-mask); outlier: the mask alone
    on heavy-tailed, decoder-like features (Student-t(3) scaled per channel), windows 3, 5.
    Prints the medians, the speedup and the agreement; returns them."""
    import torch

    import lpl_ext

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    if bench == "outlier":
        y = (torch.distributions.StudentT(3.0).sample(shape) * torch.rand(1, shape[1], 1, 1) * 3).to(dt)
        fns = {"eager formulation": lambda: ref.reference_outlier_keep(y, 3, 5).bool(),
               "lpl_ext.outlier_mask": lambda: lpl_ext.outlier_mask(y)}
        what = f"shape {tuple(shape)} {dtype}"
    else:
        x = torch.randn(shape, dtype=dt)
        y = 0.7 * x + 0.5 * torch.randn(shape, dtype=dt)
        keep = lpl_ext.outlier_mask(y) if mask else None
        keep_f = keep.to(dt) if keep is not None else None
        grad_out = torch.linspace(0.5, 1.5, shape[0], dtype=dt)

        def fwd_bwd(fn: Callable[[Any], Any]) -> Callable[[], Tuple[Any, Any]]:
            def call() -> Tuple[Any, Any]:
                xr = x.detach().requires_grad_(True)
                loss = fn(xr)
                (loss * grad_out).sum().backward()
                return loss.detach(), xr.grad
            return call

        fns = {"eager formulation, fwd+bwd": fwd_bwd(lambda xr: ref.reference_layer(xr, y, keep_f, norm, distance, 1.0)),
               "lpl_ext.feature_distance, fwd+bwd": fwd_bwd(
                   lambda xr: lpl_ext.feature_distance(xr, y, keep, norm=norm, distance=distance))}
        what = f"shape {tuple(shape)} {dtype}, norm {norm}, {distance}, mask {mask}"
    times = common.time_interleaved(fns, "cpu", reps)
    log(f"{what}; torch threads {torch.get_num_threads()}, "
        f"lpl_ext omp threads {lpl_ext.build_info()['omp_max_threads']}")
    for name, (wall, _, _) in times.items():
        log(f"{name}: median {statistics.median(wall) * 1e3:.1f} ms  (all: {', '.join(f'{t * 1e3:.0f}' for t in wall)})")
    (eager_wall, _, eager), (ext_wall, _, ext) = times.values()
    result = {"speedup": statistics.median(eager_wall) / statistics.median(ext_wall)}
    if bench == "outlier":
        result["identical"] = bool(torch.equal(eager, ext))
        log(f"speedup {result['speedup']:.1f}x, masks identical: {result['identical']}")
    else:
        (loss_r, grad_r), (loss_e, grad_e) = eager, ext
        result["loss_err"] = ((loss_e - loss_r).abs() / loss_r.abs().clamp_min(1e-30)).max().item()
        result["grad_err"] = ((grad_e - grad_r).abs().max() / grad_r.abs().max().clamp_min(1e-30)).item()
        log(f"speedup {result['speedup']:.1f}x; max rel. difference: loss {result['loss_err']:.1e}, "
            f"grad {result['grad_err']:.1e} (of max |grad|)")
    return result
