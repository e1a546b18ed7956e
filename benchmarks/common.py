"""Shared helpers of the lpl_ext benchmarks: timing, peak memory, copy bandwidth, the
results CSV and the worker-subprocess protocol.

Every comparison script runs each variant in a fresh worker subprocess
(``python -m benchmarks.<script> --worker --variant V ...``) so that CPU peak RSS belongs
to that variant alone; the worker prints one ``BENCH_JSON {...}`` line per workload and
the parent (``run_all.py`` or the script's own ``main``) collects them into CSV rows.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
JSON_PREFIX = "BENCH_JSON "

# Columns of results.csv. A run's rows are keyed by (device, torch_version,
# lpl_ext_version): a re-run on the same key replaces them, other keys are kept.
CSV_FIELDS = [
    "device", "torch_version", "lpl_ext_version", "threads", "bench", "workload", "variant",
    "status", "note", "shape", "dtype", "values_per_side", "feature_bytes", "floor_bytes",
    "bandwidth_gbs", "floor_ms", "median_ms", "p20_ms", "p80_ms", "reps", "first_call_s",
    "extra_mem_mib", "extra_over_features", "time_over_floor", "timestamp",
]
KEY_FIELDS = ("device", "torch_version", "lpl_ext_version")


# ---------------------------------------------------------------------------- environment

def ensure_repo_on_path() -> None:
    """Make ``import benchmarks`` and ``import lpl_ext`` work when run as a script."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """Human-readable device key: the GPU name for cuda, else the CPU model and thread count."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def lpl_ext_version() -> str:
    try:
        import lpl_ext

        return str(getattr(lpl_ext, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return f"unavailable ({type(exc).__name__})"


def env_info(device: str) -> Dict[str, Any]:
    """The CSV key of this run plus the thread count."""
    import torch

    return {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "lpl_ext_version": lpl_ext_version(),
        "threads": torch.get_num_threads(),
    }


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


# ---------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Wall-clock samples of one measured call, in seconds."""

    samples: List[float]
    first_call_s: float

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.samples)

    def quantile_ms(self, q: float) -> float:
        """Linear-interpolated quantile q in [0, 1] of the samples, in ms."""
        s = sorted(self.samples)
        if len(s) == 1:
            return 1e3 * s[0]
        pos = q * (len(s) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return 1e3 * (s[lo] + (s[hi] - s[lo]) * (pos - lo))


def time_call(
    fn: Callable[[], Any],
    device: str,
    *,
    reps: int = 7,
    min_reps: int = 3,
    budget_s: float = 10.0,
    warmup: int = 1,
    between: Optional[Callable[[], None]] = None,
    on_measure_start: Optional[Callable[[], None]] = None,
) -> Timing:
    """Time ``fn()`` after ``warmup`` calls; the number of timed calls is ``reps``, cut to
    what fits ``budget_s`` (never below ``min_reps``). ``between`` runs untimed before
    every call (e.g. dropping .grad); ``on_measure_start`` runs once after the warm-up
    (e.g. resetting the peak-memory counter). The first warm-up call is reported apart
    (it includes torch.compile's compilation)."""
    def timed_call() -> float:
        if between:
            between()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    warm = [timed_call() for _ in range(max(warmup, 0))]
    first = warm[0] if warm else 0.0
    est = warm[-1] if warm else 0.0  # the last warm-up call estimates the steady state
    n = reps
    if est > 0:
        n = max(min_reps, min(reps, int(budget_s / est)))
    if on_measure_start:
        on_measure_start()
    return Timing([timed_call() for _ in range(n)], first)


# ---------------------------------------------------------------------------- memory

def _proc_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the kernel, so memory freed by the warm-up is
    not silently reused (and thus not counted) by the measured calls."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of the calls made between ``start()`` and ``stop()``.

    CUDA: torch.cuda.max_memory_allocated minus memory_allocated at start. CPU: peak RSS
    (VmHWM, reset through /proc/self/clear_refs) minus RSS at start, in this (fresh,
    per-variant) process; when the kernel refuses the reset, ru_maxrss is used and the
    result is flagged ``approximate``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0
        self.approximate = False

    def start(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.base = torch.cuda.memory_allocated(dev)
            return
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.approximate = False
        except OSError:
            self.approximate = True
        rss = _proc_status_kib("VmRSS")
        self.base = 1024 * (rss or 0)

    def stop(self) -> int:
        """Peak extra bytes since start()."""
        if self.device.startswith("cuda"):
            import torch

            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            return int(torch.cuda.max_memory_allocated(dev) - self.base)
        if not self.approximate:
            hwm = _proc_status_kib("VmHWM")
            if hwm is not None:
                return max(0, 1024 * hwm - self.base)
        import resource

        self.approximate = True
        return max(0, 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base)


# ---------------------------------------------------------------------------- bandwidth

def copy_bandwidth(device: str, nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Copy bandwidth in bytes/s, counting read + write (2 * nbytes per copy), from
    torch's own multi-threaded ``copy_`` of an nbytes float32 buffer; the fastest of
    ``reps`` copies is used, so noise only ever lowers the floor (conservative)."""
    import torch

    n = max(nbytes // 4, 1)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touched: page faults are not a copy cost
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * 4 / best


# ---------------------------------------------------------------------------- rows

def base_row(env: Dict[str, Any], bench: str, workload: str, variant: str) -> Dict[str, Any]:
    row = {k: "" for k in CSV_FIELDS}
    row.update(env)
    row.update(bench=bench, workload=workload, variant=variant, status="ok",
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row


def skipped_row(env: Dict[str, Any], bench: str, workload: str, variant: str, why: str) -> Dict[str, Any]:
    row = base_row(env, bench, workload, variant)
    row.update(status="skipped", note=why)
    return row


def fill_measurement(
    row: Dict[str, Any], timing: Timing, extra_bytes: Optional[int], feature_bytes: int, floor_bytes: int,
    bandwidth: Optional[float],
) -> Dict[str, Any]:
    """Add times, memory and the bandwidth floor to a row."""
    row["median_ms"] = round(timing.median_ms, 3)
    row["p20_ms"] = round(timing.quantile_ms(0.2), 3)
    row["p80_ms"] = round(timing.quantile_ms(0.8), 3)
    row["reps"] = len(timing.samples)
    row["first_call_s"] = round(timing.first_call_s, 3)
    row["feature_bytes"] = feature_bytes
    row["floor_bytes"] = floor_bytes
    if extra_bytes is not None:
        row["extra_mem_mib"] = round(extra_bytes / 2**20, 1)
        if feature_bytes:
            row["extra_over_features"] = round(extra_bytes / feature_bytes, 3)
    if bandwidth:
        row["bandwidth_gbs"] = round(bandwidth / 1e9, 2)
        floor_ms = 1e3 * floor_bytes / bandwidth
        row["floor_ms"] = round(floor_ms, 3)
        if floor_ms > 0:
            row["time_over_floor"] = round(timing.median_ms / floor_ms, 2)
    return row


def emit(row: Dict[str, Any]) -> None:
    """Worker side: hand one row to the parent."""
    print(JSON_PREFIX + json.dumps(row), flush=True)


def run_worker(
    module: str, args: Sequence[str], *, env_extra: Optional[Dict[str, str]] = None, timeout_s: float = 1800.0,
) -> tuple[List[Dict[str, Any]], str]:
    """Run ``python -m module *args`` in a fresh process from the repo root; return the
    rows it emitted and, when it failed, a one-line reason (else '')."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if env_extra:
        env.update(env_extra)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=str(REPO), env=env, capture_output=True, text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return _parse_rows(out), f"timed out after {timeout_s:.0f} s"
    rows = _parse_rows(proc.stdout)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        return rows, f"worker exit {proc.returncode}: {tail[0][:200]}"
    return rows, ""


def collect_variants(
    bench: str, module: str, names: Sequence[str], shapes: Dict[str, str], variants: Sequence[str],
    env: Dict[str, Any], worker_args: Sequence[str], inprocess: bool,
    local_row: Callable[[str, str], Dict[str, Any]], log: Callable[[str], None],
) -> List[Dict[str, Any]]:
    """Run every variant over the workloads ``names``: one fresh worker process per
    (workload, variant) (``python -m module --worker --variant V *worker_args --workloads W``), or,
    with ``inprocess``, ``local_row(variant, name)`` here (faster; peak memory is then
    not per variant and rows say so). Workloads a crashed worker did not report get an
    error row carrying the reason."""
    rows: List[Dict[str, Any]] = []
    # Workload-major order: the variants of one workload run back to back, so a load that
    # drifts over the run (a shared machine) skews their ratios as little as possible.
    for n in names:
        log(f"[{bench}] {n}")
        for variant in variants:
            if inprocess:
                got, failure = [local_row(variant, n)], ""
                if got[0]["status"] == "ok":
                    got[0]["note"] = (got[0].get("note") or "") + "in-process run (memory not isolated)"
            else:
                got, failure = run_worker(module, ["--worker", "--variant", variant, *worker_args, "--workloads", n])
            if not any(r["workload"] == n for r in got):
                r = base_row(env, bench, n, variant)
                r.update(status="error", note=failure or "worker emitted no row", shape=shapes.get(n, ""))
                got.append(r)
            for r in got:
                log(f"  {variant:<10} {r['status']:<8} median {r.get('median_ms', '')} ms "
                    f"extra {r.get('extra_mem_mib', '')} MiB {r.get('note', '')}")
            rows += got
    return rows


def run_grid(
    bench: str, module: str, grid: Sequence[Any], name_filter: Optional[str], variants: Sequence[str],
    env: Dict[str, Any], worker_args: Sequence[str], inprocess: bool,
    measure_one: Callable[[str, Any], Dict[str, Any]], log: Callable[[str], None],
) -> List[Dict[str, Any]]:
    """Parent side of a bench: every variant over the workloads of ``grid`` whose names
    match ``name_filter`` (a regular expression), through :func:`collect_variants`.
    ``measure_one(variant, workload)`` measures one row (in-process runs only)."""
    keep = set(filter_names([wl.name for wl in grid], name_filter))
    by_name = {wl.name: wl for wl in grid if wl.name in keep}
    if not by_name:
        return []

    def local_row(variant: str, name: str) -> Dict[str, Any]:
        wl = by_name[name]
        return safe_row(env, bench, name, variant, wl.shape_text(), lambda: measure_one(variant, wl))

    shapes = {n: wl.shape_text() for n, wl in by_name.items()}
    return collect_variants(bench, module, list(by_name), shapes, variants, env, worker_args, inprocess,
                            local_row, log)


def worker_rows(bench: str, grid: Sequence[Any], names: Sequence[str], variant: str, env: Dict[str, Any],
                measure_one: Callable[[str, Any], Dict[str, Any]]) -> int:
    """Worker side of a bench: measure ``variant`` on the named workloads of ``grid`` and
    emit one row each (an error row for a workload that raises)."""
    by_name = {wl.name: wl for wl in grid}
    for name in names:
        wl = by_name[name]
        emit(safe_row(env, bench, name, variant, wl.shape_text(), lambda: measure_one(variant, wl)))
    return 0


def safe_row(env: Dict[str, Any], bench: str, name: str, variant: str, shape: str,
             measure: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """measure(), or an error row naming the exception: one failing workload must not
    hide the others."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001
        row = base_row(env, bench, name, variant)
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}", shape=shape)
        return row


def _parse_rows(text: str) -> List[Dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if line.startswith(JSON_PREFIX):
            rows.append(json.loads(line[len(JSON_PREFIX):]))
    return rows


# ---------------------------------------------------------------------------- csv

def read_csv(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_csv(path: Path, new_rows: Iterable[Dict[str, Any]], whole_key: bool = True) -> List[Dict[str, Any]]:
    """Write ``new_rows`` into the CSV at path and return all rows. ``whole_key``: the old
    rows of the same (device, torch_version, lpl_ext_version) key are all replaced (a full
    run); otherwise only those of the same (key, bench, workload, variant) (a subset run
    adds to the earlier rows of its key). Rows of other keys are always kept."""
    new_rows = list(new_rows)

    def ident(r: Dict[str, Any]) -> tuple:
        base = tuple(str(r.get(k, "")) for k in KEY_FIELDS)
        return base if whole_key else base + (str(r.get("bench", "")), str(r.get("workload", "")),
                                              str(r.get("variant", "")))

    replaced = {ident(r) for r in new_rows}
    kept = [r for r in read_csv(path) if ident(r) not in replaced]
    rows = kept + new_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    return rows


def filter_names(names: Sequence[str], pattern: Optional[str]) -> List[str]:
    """The names matching the regular expression ``pattern`` (all when None)."""
    if not pattern:
        return list(names)
    import re

    rx = re.compile(pattern)
    return [n for n in names if rx.search(n)]


def parse_list(text: Optional[str], allowed: Sequence[str], what: str) -> List[str]:
    """Comma-separated choice list; raises ValueError naming ``what`` on unknown items."""
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {bad}; expected a subset of {list(allowed)}")
    return items
