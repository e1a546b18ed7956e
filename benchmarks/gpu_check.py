"""The prepared GPU check: everything a lent GPU should answer, in one call of about 8
minutes, written to one markdown report that is rewritten after every step and every
benchmark row, so a call cut short keeps what it did (docs/cuda.md, "Verifying on a GPU").

Steps, in order of importance; each has its own share of the time budget (``--budget-s``,
default 470 s from the start of the script), and a failing step does not stop the others:
  build      setup.py build_ext --inplace for the local GPU's architecture only
  tests      the CUDA tests, once with the shipped cubin and once with NVRTC
  sanitizer  compute-sanitizer memcheck and racecheck over a small CUDA subset
  bench      the LPL head on the SDXL decoder pyramid at 1024 px, batch 4, fp32, forward +
             backward, with and without outliers: lpl_ext (each kernel variant given with
             --kernel-env) against the plain-PyTorch head eager and under torch.compile;
             then the outlier mask on the masked levels and one row per norm; median and
             20/80% spread, peak memory, and the ratio to the floor (minimal bytes / copy
             bandwidth of 1 GiB measured in the same run); masks deterministic and equal to
             the CPU's.

    bash benchmarks/gpu_check.sh "$OUT"         # on the GPU machine
    python benchmarks/gpu_check.py --dry-run    # here: the same code at micro shapes on the
                                                # CPU, the tests step on the emulated device
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the in-place build of this checkout, not an installed copy
    sys.path.insert(0, str(REPO))
STEPS = ["build", "tests", "sanitizer", "bench"]
# Seconds of the budget each step may use at most (it also never runs past the budget).
STEP_SHARE_S = {"build": 100, "tests": 130, "sanitizer": 90, "bench": 170}
DEFAULT_BUDGET_S = 470.0
# Old and new kernels side by side in one call, so a lent GPU decides which to keep (issue 23).
DEFAULT_KERNEL_ENV = "LPL_EXT_KERNEL_SET=v2,v1"
SANITIZER_TOOLS = ["memcheck", "racecheck"]
SANITIZER_SUBSET = ["tests/test_exact_zero.py", "-k", "cuda and (float32 or bfloat16) and shared"]
CUDA_TESTS = ["tests/test_feature_distance.py", "tests/test_outlier_mask.py", "tests/test_exact_zero.py",
              "tests/test_large_index.py", "tests/test_cuda_gpu.py"]
# Dry run: the CUDA host path and kernels on the emulated device (tests/test_cuda_emulated.py)
# when that test exists, else the stand-in driver's launch tests.
DRY_TESTS = ["tests/test_cuda_emulated.py"] if (REPO / "tests" / "test_cuda_emulated.py").exists() else [
    "tests/test_cuda_loader.py"]


@dataclass
class StepResult:
    name: str
    status: str = "not run"  # passed / failed / skipped / not run
    seconds: float = 0.0
    summary: str = ""
    log_tail: str = ""


@dataclass
class BenchItem:
    """One planned benchmark row: bench ('head' or 'outlier'), its workload (a
    benchmarks/bench_head.py HeadWorkload / OutlierWorkload), variant, and the kernel
    environment it runs under."""

    bench: str
    workload: Any
    variant: str
    kernel_env: Tuple[Tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.workload.name

    @property
    def label(self) -> str:
        env = ",".join(f"{k}={v}" for k, v in self.kernel_env)
        return f"{self.variant}[{env}]" if env else self.variant


@dataclass
class Report:
    env: Dict[str, Any] = field(default_factory=dict)
    steps: List[StepResult] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    copy_gbs: Optional[float] = None
    copy_mib: int = 1024
    mask_checks: List[str] = field(default_factory=list)


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v in (None, ""):
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def render_report(report: Report) -> str:
    """The markdown report."""
    out = ["# lpl_ext GPU check", ""]
    for k, v in report.env.items():
        out.append(f"- **{k}**: {v}")
    out += ["", "## Steps", "", "| step | status | seconds | summary |", "|---|---|---|---|"]
    for s in report.steps:
        out.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.summary.replace('|', '/')} |")
    out += ["", "## Benchmarks", "",
            f"Device copy (read + write of {report.copy_mib} MiB): **{_fmt(report.copy_gbs)} GB/s**. Floor = minimal bytes "
            "(read x and y, the 1-byte mask where masked, write the gradient; outlier mask: read y, write the "
            "mask) / copy bandwidth; `x floor` = median time / floor time. Spread: 20% and 80% quantiles.", "",
            "| bench | workload | variant | median ms | p20-p80 ms | peak extra MiB | floor ms | x floor | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        spread = f"{_fmt(r.get('p20_ms'), '.2f')}-{_fmt(r.get('p80_ms'), '.2f')}" if r.get("p20_ms") not in (None, "") \
            else "-"
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(f"| {r.get('bench')} | {r.get('workload')} | {r.get('variant')} | {_fmt(r.get('median_ms'), '.3f')} "
                   f"| {spread} | {_fmt(r.get('extra_mem_mib'))} | {_fmt(r.get('floor_ms'), '.3f')} | "
                   f"{_fmt(r.get('time_over_floor'), '.2f')} | {r.get('status', '')}{note} |".replace("\n", " "))
    out += ["", "## Outlier masks: determinism and CPU parity", ""]
    out += [f"- {line}" for line in report.mask_checks] or ["- not run"]
    for s in report.steps:
        if s.log_tail:
            out += ["", f"## Log tail: {s.name}", "", "```", s.log_tail.rstrip(), "```"]
    return "\n".join(out) + "\n"


def parse_kernel_env(text: Optional[str]) -> List[Tuple[Tuple[str, str], ...]]:
    """'NAME=a,b' -> [((NAME, a),), ((NAME, b),)]; None or '' -> [()] (the build's kernels)."""
    if not text:
        return [()]
    name, sep, values = text.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name.strip() or not vals:
        raise ValueError(f"--kernel-env: expected NAME=VALUE[,VALUE...], got {text!r}")
    return [((name.strip(), v),) for v in vals]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder of the report and logs (default $OUT, else gpu_check_out)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (default all)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per benchmark row (default 10)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget of the whole check from its start (default {DEFAULT_BUDGET_S:.0f}); "
                        "each step also has its own share")
    p.add_argument("--kernel-env", default=os.environ.get("GPU_CHECK_KERNEL_ENV", DEFAULT_KERNEL_ENV),
                   help="benchmark lpl_ext once per value of an environment switch, NAME=V1,V2; default "
                        f"{DEFAULT_KERNEL_ENV} (the current kernels and the 0.2 ones, docs/cuda.md \"Switches\"); "
                        "'' for the default kernels only")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: build skipped, the tests step on the emulated device, the bench rows at micro "
                        "shapes on the CPU, sanitizers skipped")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        p.error(f"--steps: unknown step(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                f"expected a subset of {', '.join(STEPS)}")
    if args.reps < 1:
        p.error(f"--reps: must be >= 1, got {args.reps}")
    if not args.budget_s > 0:
        p.error(f"--budget-s: must be > 0, got {args.budget_s}")
    try:
        args.kernel_envs = parse_kernel_env(args.kernel_env)
    except ValueError as exc:
        p.error(str(exc))
    args.steps = steps
    return args


class Clock:
    """The budget: seconds left overall, and the time a step may take (its share, never
    past the end of the budget)."""

    def __init__(self, budget_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.end = now() + budget_s

    def left(self) -> float:
        return max(0.0, self.end - self.now())

    def allot(self, step: str) -> float:
        return min(STEP_SHARE_S[step], self.left())


# ---- the steps -------------------------------------------------------------------


def _run(name: str, cmd: List[str], out: Path, timeout: float, env: Optional[Dict[str, str]] = None) -> StepResult:
    """Run cmd from the repo root, its output in OUT/name.log; failed on a non-zero exit or
    a timeout (which keeps the output so far)."""
    t0 = time.monotonic()
    log = out / f"{name}.log"
    if timeout <= 1:
        return StepResult(name, "skipped", 0.0, "no time left in the budget")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        def text_of(b: Any) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        text, rc = f"{text_of(exc.stdout)}{text_of(exc.stderr)}\n[timed out after {timeout:.0f} s]", -1
    log.write_text(" ".join(cmd) + "\n" + text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return StepResult(name, "passed" if rc == 0 else "failed", time.monotonic() - t0, lines[-1] if lines else "",
                      "" if rc == 0 else "\n".join(lines[-40:]))


def gpu_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def step_build(out: Path, clock: Clock) -> List[StepResult]:
    return [_run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], out, clock.allot("build"),
                 {"LPL_EXT_CUDA_ARCHS": gpu_arch()})]


def step_tests(out: Path, clock: Clock, dry: bool) -> List[StepResult]:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if dry:
        return [_run("tests-emulated", [*pytest, "-x", *DRY_TESTS], out, clock.allot("tests"))]
    share = clock.allot("tests")
    start = time.monotonic()
    results = []
    for i, mode in enumerate(("cubin", "nvrtc")):
        # each mode gets half of what is left of the step's share
        left = share - (time.monotonic() - start)
        results.append(_run(f"tests-{mode}", [*pytest, "-x", "-k", "cuda", *CUDA_TESTS], out,
                            min(left / (2 - i), clock.left()), {"LPL_EXT_KERNELS": mode}))
    return results


def step_sanitizer(out: Path, clock: Clock, dry: bool) -> List[StepResult]:
    if dry:
        return [StepResult(f"sanitizer-{tool}", "skipped", 0.0, "dry run: compute-sanitizer needs a GPU "
                           "(the emulated device's TSan/ASan runs are CI steps)") for tool in SANITIZER_TOOLS]
    share = clock.allot("sanitizer")
    start = time.monotonic()
    results = []
    for i, tool in enumerate(SANITIZER_TOOLS):
        left = share - (time.monotonic() - start)
        results.append(_run(f"sanitizer-{tool}", ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3",
                                                   sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                   *SANITIZER_SUBSET], out, min(left / (2 - i), clock.left())))
    return results


def bench_plan(dry: bool, kernel_envs: Sequence[Tuple[Tuple[str, str], ...]]) -> List[BenchItem]:
    """Rows in order of importance: the pyramid head (shared, mse) with and without
    outliers, lpl_ext per kernel variant, then eager, then compiled (compiling costs the
    most); then the outlier mask per masked level, lpl_ext then eager; then lpl_ext's head
    for the other norms. Dry run: the quick grid's micro pyramid (latent 4x4)."""
    from benchmarks import bench_head

    mode = "quick" if dry else "gpu"
    res, batch = (32, 2) if dry else (1024, 4)
    plan: List[BenchItem] = []
    for outliers in (True, False):
        w = bench_head.HeadWorkload(res, batch, bench_head.PYRAMID, "shared", "mse", outliers)
        plan += [BenchItem("head", w, "lpl_ext", env) for env in kernel_envs]
        plan += [BenchItem("head", w, "eager"), BenchItem("head", w, "compile")]
    for w in bench_head.workloads("outlier", mode):
        plan += [BenchItem("outlier", w, "lpl_ext", env) for env in kernel_envs]
        plan.append(BenchItem("outlier", w, "eager"))
    from lpl_ext import _C  # imported after the build step: the option list of this build

    for norm in (n for n in _C.NORMS if n != "shared"):
        w = bench_head.HeadWorkload(res, batch, bench_head.PYRAMID, norm, "mse", True)
        plan += [BenchItem("head", w, "lpl_ext", env) for env in kernel_envs]
    return plan


def bench_row(item: BenchItem, device: str, env: Dict[str, Any], bandwidth: float, reps: int,
              budget_s: float) -> Dict[str, Any]:
    """One row (bench_head.measure_workload), measured in this process with the item's
    kernel environment set."""
    from benchmarks import bench_head

    saved = {k: os.environ.get(k) for k, _ in item.kernel_env}
    os.environ.update(dict(item.kernel_env))
    try:
        (row,) = bench_head.measure_workload(item.bench, item.variant, item.workload, device, env, bandwidth, reps,
                                             budget_s)
        return dict(row, variant=item.label)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _empty_cache(device)


def _empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def mask_checks(device: str, dry: bool) -> List[str]:
    """Outlier masks of each masked pyramid level: identical across two runs and to the CPU's."""
    import torch

    from benchmarks import bench_head

    import lpl_ext

    lines = []
    for wl in bench_head.workloads("outlier", "quick" if dry else "gpu"):
        _, ys = bench_head.make_inputs(wl, device, with_x=False)
        y = ys[0]
        closing, opening = wl.windows
        first = lpl_ext.outlier_mask(y, closing=closing, opening=opening)
        second = lpl_ext.outlier_mask(y, closing=closing, opening=opening)
        cpu = lpl_ext.outlier_mask(y.cpu(), closing=closing, opening=opening)
        lines.append(f"{wl.name}: identical across runs: {bool(torch.equal(first, second))}; identical to the "
                     f"CPU: {bool(torch.equal(first.cpu(), cpu))}; kept {float(first.float().mean()):.4f}")
        del y, ys, first, second, cpu
        _empty_cache(device)
    return lines


def step_bench(report: Report, args: argparse.Namespace, clock: Clock, write: Callable[[], None]) -> StepResult:
    from benchmarks import common

    t0 = time.monotonic()
    deadline = t0 + clock.allot("bench")
    device = "cpu" if args.dry_run else "cuda"
    env = common.env_info(device)
    report.copy_mib = 16 if args.dry_run else 1024
    bandwidth = common.copy_bandwidth(device, nbytes=report.copy_mib << 20)
    report.copy_gbs = bandwidth / 1e9
    plan = bench_plan(args.dry_run, args.kernel_envs)
    for item in plan:
        left = deadline - time.monotonic()
        if left <= 0:
            report.rows.append({"bench": item.bench, "workload": item.name, "variant": item.label,
                                "status": "skipped", "note": "over the time budget"})
            continue
        report.rows.append(bench_row(item, device, env, bandwidth, args.reps, min(20.0, left / 2)))
        write()
    if deadline - time.monotonic() > 0:
        try:
            report.mask_checks = mask_checks(device, args.dry_run)
        except Exception as exc:  # noqa: BLE001
            report.mask_checks = [f"error: {type(exc).__name__}: {exc}"]
    else:
        report.mask_checks = ["skipped: over the time budget"]
    errors = [r for r in report.rows if r.get("status") == "error"]
    bad_masks = [c for c in report.mask_checks if "False" in c or c.startswith("error")]
    ok = sum(r.get("status") == "ok" for r in report.rows)
    return StepResult("bench", "failed" if errors or bad_masks else "passed", time.monotonic() - t0,
                      f"{ok} rows ok, {len(errors)} errors, {len(bad_masks)} mask problems")


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
    clock = Clock(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(env=environment())
    if args.dry_run:
        report.env["mode"] = "dry run: no GPU; tests on the emulated device, bench rows at micro shapes on the CPU"
    path = out / "gpu_check.md"

    def write() -> None:
        path.write_text(render_report(report))

    write()
    for name in args.steps:
        print(f"[gpu_check] {name} ({clock.left():.0f} s left)", flush=True)
        if name == "build":
            report.steps += ([StepResult("build", "skipped", 0.0, "dry run: the in-place build is used")]
                             if args.dry_run else step_build(out, clock))
            try:
                import lpl_ext

                report.env["build_info"] = json.dumps(lpl_ext.build_info())
            except Exception as exc:  # the report says why instead of dying
                report.env["build_info"] = f"import failed: {exc}"
        elif name == "tests":
            report.steps += step_tests(out, clock, args.dry_run)
        elif name == "sanitizer":
            report.steps += step_sanitizer(out, clock, args.dry_run)
        elif name == "bench":
            try:
                report.steps.append(step_bench(report, args, clock, write))
            except Exception as exc:  # noqa: BLE001
                report.steps.append(StepResult("bench", "failed", 0.0, f"{type(exc).__name__}: {exc}"))
        write()
    print(f"report: {path}")
    return 0 if all(s.status in ("passed", "not run", "skipped") for s in report.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
