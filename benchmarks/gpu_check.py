"""The prepared GPU check: everything a lent GPU should answer, in one run of a few
minutes, written to one markdown report (docs/cuda.md, "Verifying on a GPU").

Steps (each one's output is kept; a failing step does not stop the others):
  build      setup.py build_ext --inplace for the local GPU's architecture only
  tests      the CUDA tests, once with the shipped cubin and once with NVRTC
  sanitizer  compute-sanitizer memcheck, racecheck and synccheck over a small CUDA subset
  bench      feature distance (every norm, with and without mask) and the outlier mask on
             (2,512,256,256), (1,128,1024,1024), (1,512,128,128) in fp32 and bf16:
             achieved GB/s against the minimal bytes each op must move, the device copy
             bandwidth, and whether masks are bit-identical across runs and to the CPU

    bash benchmarks/gpu_check.sh              # on the GPU machine: build, run, report
    python benchmarks/gpu_check.py --dry-run  # anywhere: the plan and an empty report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the in-place build of this checkout, not an installed copy
    sys.path.insert(0, str(REPO))
SHAPES = [(2, 512, 256, 256), (1, 128, 1024, 1024), (1, 512, 128, 128)]
DTYPES = ["float32", "bfloat16"]
NORMS = ["default", "shared", "batch", "none"]
STEPS = ["build", "tests", "sanitizer", "bench"]
SANITIZER_TOOLS = ["memcheck", "racecheck", "synccheck"]
SANITIZER_SUBSET = ["tests/test_exact_zero.py", "-k", "cuda and (float32 or bfloat16) and shared"]
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass
class BenchRow:
    """One benchmark row: an op on a shape and dtype, timed on the GPU."""

    op: str  # "feature_distance" or "outlier_mask"
    shape: tuple
    dtype: str
    norm: str = ""
    masked: bool = False
    median_ms: Optional[float] = None
    status: str = "not run"
    note: str = ""

    @property
    def min_bytes(self) -> int:
        return min_bytes(self.op, self.shape, self.dtype, self.masked)

    @property
    def gbs(self) -> Optional[float]:
        return None if not self.median_ms else self.min_bytes / (self.median_ms * 1e-3) / 1e9


def min_bytes(op: str, shape: Sequence[int], dtype: str, masked: bool) -> int:
    """Bytes an op must move at the least. feature_distance with its gradient reads x
    and y (and the 1-byte mask) and writes the gradient; outlier_mask reads y once and
    writes the 1-byte mask."""
    n = 1
    for s in shape:
        n *= int(s)
    item = ITEMSIZE[dtype]
    if op == "feature_distance":
        return n * (3 * item + (1 if masked else 0))
    if op == "outlier_mask":
        return n * (item + 1)
    raise ValueError(f"op: unknown option {op!r}; expected 'feature_distance' or 'outlier_mask'")


def plan_rows(shapes: Sequence[tuple] = SHAPES, dtypes: Sequence[str] = DTYPES,
              norms: Sequence[str] = NORMS) -> List[BenchRow]:
    """Every row the bench step runs, in order."""
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for masked in (False, True):
                for norm in norms:
                    rows.append(BenchRow("feature_distance", tuple(shape), dtype, norm, masked))
            rows.append(BenchRow("outlier_mask", tuple(shape), dtype))
    return rows


@dataclass
class StepResult:
    name: str
    status: str = "not run"  # passed / failed / skipped / not run
    seconds: float = 0.0
    summary: str = ""
    log_tail: str = ""


@dataclass
class Report:
    env: Dict[str, Any] = field(default_factory=dict)
    steps: List[StepResult] = field(default_factory=list)
    rows: List[BenchRow] = field(default_factory=list)
    copy_gbs: Optional[float] = None
    mask_checks: List[str] = field(default_factory=list)


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render_report(report: Report) -> str:
    """The markdown report."""
    out = ["# lpl_ext GPU check", ""]
    for k, v in report.env.items():
        out.append(f"- **{k}**: {v}")
    out += ["", "## Steps", "", "| step | status | seconds | summary |", "|---|---|---|---|"]
    for s in report.steps:
        out.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.summary.replace('|', '/')} |")
    out += ["", "## Bandwidth", "",
            f"Device copy (read + write of 1 GiB): **{_fmt(report.copy_gbs)} GB/s**. Floor = minimal bytes / "
            "copy bandwidth; `x floor` = measured time / floor time.", "",
            "| op | shape | dtype | norm | mask | median ms | GB/s | x floor | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        over = None
        if r.median_ms and report.copy_gbs:
            over = r.median_ms / (r.min_bytes / (report.copy_gbs * 1e9) * 1e3)
        out.append(f"| {r.op} | {'x'.join(map(str, r.shape))} | {r.dtype} | {r.norm or '-'} | "
                   f"{'yes' if r.masked else 'no'} | {_fmt(r.median_ms, '.3f')} | {_fmt(r.gbs)} | "
                   f"{_fmt(over, '.2f')} | {r.status}{' (' + r.note + ')' if r.note else ''} |")
    out += ["", "## Outlier masks: determinism and CPU parity", ""]
    out += [f"- {line}" for line in report.mask_checks] or ["- not run"]
    for s in report.steps:
        if s.log_tail:
            out += ["", f"## Log tail: {s.name}", "", "```", s.log_tail.rstrip(), "```"]
    return "\n".join(out) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder of the report and logs (default $OUT, else gpu_check_out)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (default all)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per benchmark row (default 20)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; later benchmark rows are skipped past it (default 420)")
    p.add_argument("--dry-run", action="store_true", help="plan and write the report without a GPU")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        p.error(f"--steps: unknown step(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                f"expected a subset of {', '.join(STEPS)}")
    if args.reps < 1:
        p.error(f"--reps: must be >= 1, got {args.reps}")
    args.steps = steps
    return args


# ---- the steps that need the GPU ---------------------------------------------------


def _run(name: str, cmd: List[str], out: Path, env: Optional[Dict[str, str]] = None,
         timeout: float = 300) -> StepResult:
    t0 = time.time()
    log = out / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}{exc.stderr or ''}\n[timed out after {timeout:.0f} s]", -1
    log.write_text(" ".join(cmd) + "\n" + text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return StepResult(name, "passed" if rc == 0 else "failed", time.time() - t0, lines[-1] if lines else "",
                      "" if rc == 0 else "\n".join(lines[-40:]))


def gpu_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def step_build(out: Path) -> StepResult:
    return _run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], out,
                {"LPL_EXT_CUDA_ARCHS": gpu_arch()}, timeout=300)


def step_tests(out: Path) -> List[StepResult]:
    tests = ["tests/test_feature_distance.py", "tests/test_outlier_mask.py", "tests/test_exact_zero.py"]
    return [_run(f"tests-{mode}", [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda", *tests], out,
                 {"LPL_EXT_KERNELS": mode}, timeout=240) for mode in ("cubin", "nvrtc")]


def step_sanitizer(out: Path) -> List[StepResult]:
    return [_run(f"sanitizer-{tool}", ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3",
                                       sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       *SANITIZER_SUBSET], out, timeout=200) for tool in SANITIZER_TOOLS]


def _time_cuda(fn, reps: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def step_bench(report: Report, reps: int, deadline: float) -> StepResult:
    import torch

    import lpl_ext

    t0 = time.time()
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    report.copy_gbs = 2 * 2**30 / (_time_cuda(lambda: dst.copy_(src), reps) * 1e-3) / 1e9
    del src, dst
    report.rows = plan_rows()
    masks: Dict[tuple, Any] = {}
    for row in report.rows:
        if time.time() > deadline:
            row.status, row.note = "skipped", "over the time budget"
            continue
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            dtype = getattr(torch, row.dtype)
            y = torch.randn(row.shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)
            if row.op == "outlier_mask":
                row.median_ms = _time_cuda(lambda: lpl_ext.outlier_mask(y), reps)
                masks[(row.shape, row.dtype)] = y
            else:
                x = (y.float() + 0.1 * torch.randn(row.shape, generator=g, device="cuda")).to(dtype)
                mask = lpl_ext.outlier_mask(y) if row.masked else None
                x.requires_grad_(True)

                def fwd_bwd():
                    lpl_ext.feature_distance(x, y, mask, norm=row.norm).sum().backward()
                    x.grad = None

                row.median_ms = _time_cuda(fwd_bwd, reps)
            row.status = "ok"
        except Exception as exc:  # recorded in the report; the other rows still run
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:200]
        torch.cuda.empty_cache()
    for (shape, dtype), y in masks.items():
        first, second = lpl_ext.outlier_mask(y), lpl_ext.outlier_mask(y)
        cpu = lpl_ext.outlier_mask(y.cpu())
        same_runs = bool(torch.equal(first, second))
        same_cpu = bool(torch.equal(first.cpu(), cpu))
        report.mask_checks.append(f"{'x'.join(map(str, shape))} {dtype}: identical across runs: {same_runs}; "
                                  f"identical to the CPU: {same_cpu}; kept {float(first.float().mean()):.4f}")
    failed = [r for r in report.rows if r.status == "error"]
    bad_masks = [c for c in report.mask_checks if "False" in c]
    return StepResult("bench", "failed" if failed or bad_masks else "passed", time.time() - t0,
                      f"{sum(r.status == 'ok' for r in report.rows)} rows ok, {len(failed)} errors, "
                      f"{len(bad_masks)} mask mismatches")


def environment() -> Dict[str, Any]:
    env: Dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["gpu"] = f"nvidia-smi failed: {exc}"
    try:
        import torch

        env["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    except ImportError:
        env["torch"] = "not installed"
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(env=environment())
    deadline = time.time() + args.budget_s
    if args.dry_run:
        report.env["mode"] = "dry run: nothing executed"
        report.steps = [StepResult(s, "not run") for s in args.steps]
        report.rows = plan_rows() if "bench" in args.steps else []
    else:
        if "build" in args.steps:
            report.steps.append(step_build(out))
        try:
            import lpl_ext

            report.env["build_info"] = json.dumps(lpl_ext.build_info())
        except Exception as exc:  # the report says why instead of dying
            report.env["build_info"] = f"import failed: {exc}"
        if "tests" in args.steps:
            report.steps += step_tests(out)
        if "sanitizer" in args.steps:
            report.steps += step_sanitizer(out)
        if "bench" in args.steps:
            try:
                report.steps.append(step_bench(report, args.reps, deadline))
            except Exception as exc:
                report.steps.append(StepResult("bench", "failed", 0.0, f"{type(exc).__name__}: {exc}"))
    path = out / "gpu_check.md"
    path.write_text(render_report(report))
    print(f"report: {path}")
    return 0 if all(s.status in ("passed", "not run", "skipped") for s in report.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
