"""Shared harness of the lpl_ext benchmarks: timing, peak memory, copy bandwidth, the
results CSV and the worker-subprocess protocol.

Worker protocol: ``run_in_worker("benchmarks.bench_head:measure", **kwargs)`` calls that
function in a fresh ``python -m benchmarks.common`` process, so that the CPU peak RSS it
measures belongs to it alone; the function returns rows (dicts), which the worker prints
as ``BENCH_JSON {...}`` lines for the parent to collect. Every bench of run_all.py goes
through it: the CSV suite one process per (workload, variant), the printed benches one
process per measurement.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
JSON_PREFIX = "BENCH_JSON "
Row = Dict[str, Any]

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

def tests_module(name: str) -> Any:
    """A module of tests/: ``reference`` (the plain-PyTorch formulations) or
    ``reference_lpl`` (the restatement of the reference class). Benchmarks and tests share
    that one definition; it lives with the tests because it is their independent oracle,
    and it never imports lpl_ext, so an eager or reference worker holds nothing of it."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def missing(*modules: str) -> Optional[str]:
    """Why one of ``modules`` cannot be imported here (a skipped row's note), or None."""
    for name in modules:
        try:
            tests_module(name)
        except Exception as exc:  # noqa: BLE001 - reported in the row, not hidden
            return f"{name} not importable ({type(exc).__name__}: {exc})"
    return None


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


def env_info(device: str) -> Row:
    """The CSV key of this run (device name, torch and lpl_ext versions) plus the thread
    count. Computed once by the parent and handed to the workers."""
    import torch

    try:
        import lpl_ext

        version = str(getattr(lpl_ext, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        version = f"unavailable ({type(exc).__name__})"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch_version": torch.__version__, "lpl_ext_version": version,
            "threads": torch.get_num_threads()}


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
        pos = q * (len(s) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return 1e3 * (s[lo] + (s[hi] - s[lo]) * (pos - lo))


def time_call(fn: Callable[[], Any], device: str, *, reps: int = 7, min_reps: int = 3, budget_s: float = 10.0,
              between: Optional[Callable[[], None]] = None,
              on_measure_start: Optional[Callable[[], None]] = None) -> Timing:
    """Time ``fn()`` after one warm-up call; the number of timed calls is ``reps``, cut to
    what fits ``budget_s`` (never below ``min_reps``). ``between`` runs untimed before
    every call (e.g. dropping .grad); ``on_measure_start`` runs once after the warm-up
    (e.g. resetting the peak-memory counter). The warm-up call is reported apart (it
    includes torch.compile's compilation)."""
    def timed_call() -> float:
        if between:
            between()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    first = timed_call()  # also the estimate of the steady state
    n = max(min_reps, min(reps, int(budget_s / first))) if first > 0 else reps
    if on_measure_start:
        on_measure_start()
    return Timing([timed_call() for _ in range(n)], first)


def time_interleaved(fns: Dict[str, Callable[[], Any]], device: str, reps: int) -> Dict[str, Tuple[List[float], List[float], Any]]:
    """Wall and process-CPU seconds of each ``fns[name]()``, and its last result: one
    warm-up call each, then ``reps`` rounds calling every function once, the order rotated
    each round, so that a load drifting over the run hits all alike. CPU time counts every
    thread of this process and is insensitive to other processes competing for the cores."""
    out = {name: ([], [], fn()) for name, fn in fns.items()}
    order = list(fns)
    for r in range(reps):
        for name in order[r % len(order):] + order[: r % len(order)]:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            result = fns[name]()
            sync(device)
            out[name][0].append(time.perf_counter() - w0)
            out[name][1].append(time.process_time() - c0)
            out[name] = out[name][:2] + (result,)
    return out


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
        try:
            # Give glibc's free heap pages back to the kernel, so memory freed by the
            # warm-up is not silently reused (and thus not counted) by the measured calls.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.approximate = False
        except OSError:
            self.approximate = True
        self.base = 1024 * (_proc_status_kib("VmRSS") or 0)

    def stop(self) -> int:
        """Peak extra bytes since start()."""
        if self.device.startswith("cuda"):
            import torch

            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            return int(torch.cuda.max_memory_allocated(dev) - self.base)
        hwm = None if self.approximate else _proc_status_kib("VmHWM")
        if hwm is not None:
            return max(0, 1024 * hwm - self.base)
        import resource

        self.approximate = True
        return max(0, 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base)


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

def base_row(env: Row, bench: str, workload: str, variant: str) -> Row:
    row = {k: "" for k in CSV_FIELDS}
    row.update(env)
    row.update(bench=bench, workload=workload, variant=variant, status="ok",
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row


def measure_row(row: Row, step: Callable[[], Any], device: str, reps: int, budget_s: float,
                between: Optional[Callable[[], None]], feature_bytes: int, floor_bytes: int,
                bandwidth: Optional[float]) -> Row:
    """Time ``step`` (:func:`time_call`) and take the peak extra memory of the timed calls;
    add times, memory and the bandwidth floor to ``row``."""
    mem = PeakMemory(device)

    def measure_start() -> None:
        if between:
            between()
        mem.start()

    try:
        timing = time_call(step, device, reps=reps, budget_s=budget_s, between=between,
                           on_measure_start=measure_start)
    except NotImplementedError as exc:
        row.update(status="skipped", note=f"not implemented: {exc}")
        return row
    extra = mem.stop()
    row.update(median_ms=round(timing.median_ms, 3), p20_ms=round(timing.quantile_ms(0.2), 3),
               p80_ms=round(timing.quantile_ms(0.8), 3), reps=len(timing.samples),
               first_call_s=round(timing.first_call_s, 3), feature_bytes=feature_bytes, floor_bytes=floor_bytes,
               extra_mem_mib=round(extra / 2**20, 1))
    if feature_bytes:
        row["extra_over_features"] = round(extra / feature_bytes, 3)
    if bandwidth:
        floor_ms = 1e3 * floor_bytes / bandwidth
        row.update(bandwidth_gbs=round(bandwidth / 1e9, 2), floor_ms=round(floor_ms, 3))
        if floor_ms > 0:
            row["time_over_floor"] = round(timing.median_ms / floor_ms, 2)
    if mem.approximate:
        row["note"] = "peak RSS approximate (ru_maxrss)"
    return row


def safe_row(env: Row, bench: str, name: str, variant: str, shape: str, measure: Callable[[], Row]) -> Row:
    """measure(), or an error row naming the exception: one failing workload must not
    hide the others."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001
        row = base_row(env, bench, name, variant)
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}", shape=shape)
        return row


# ---------------------------------------------------------------------------- workers

def _call(target: str, kwargs: Row) -> List[Row]:
    module, name = target.split(":")
    return list(getattr(importlib.import_module(module), name)(**kwargs))


def run_in_worker(target: str, timeout_s: float = 1800.0, **kwargs: Any) -> Tuple[List[Row], str]:
    """Call ``target`` ("module:function", returning rows) with ``kwargs`` (JSON values)
    in a fresh process from the repo root; return the rows and, when the process failed,
    a one-line reason (else '')."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs)]
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return _parse_rows(out), f"timed out after {timeout_s:.0f} s"
    rows = _parse_rows(proc.stdout)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        return rows, f"worker exit {proc.returncode}: {tail[0][:200]}"
    return rows, ""


def _parse_rows(text: str) -> List[Row]:
    return [json.loads(line[len(JSON_PREFIX):]) for line in text.splitlines() if line.startswith(JSON_PREFIX)]


def run_grid(bench: str, target: str, grid: Sequence[Any], name_filter: Optional[str], variants: Sequence[str],
             settings: Row, inprocess: bool, log: Callable[[str], None]) -> List[Row]:
    """Parent side of a CSV bench: ``target(bench=, variant=, workload=, **settings)`` for
    every variant on the workloads of ``grid`` whose names match ``name_filter`` (a regular
    expression), one fresh worker process per (workload, variant), or, with ``inprocess``,
    here (faster; peak memory is then not per variant and the rows say so). A workload the
    worker did not report gets an error row carrying the reason."""
    rows: List[Row] = []
    # Workload-major order: the variants of one workload run back to back, so a load that
    # drifts over the run (a shared machine) skews their ratios as little as possible.
    for wl in grid:
        if name_filter and not re.search(name_filter, wl.name):
            continue
        log(f"[{bench}] {wl.name}")
        for variant in variants:
            kwargs = dict(settings, bench=bench, variant=variant, workload=wl.name)
            if inprocess:
                got, failure = _call(target, kwargs), ""
                gc.collect()
                for r in got:
                    if r["status"] == "ok":
                        r["note"] = (r.get("note") or "") + "in-process run (memory not isolated)"
            else:
                got, failure = run_in_worker(target, **kwargs)
            if not any(r["workload"] == wl.name for r in got):
                r = base_row(settings["env"], bench, wl.name, variant)
                r.update(status="error", note=failure or "worker emitted no row", shape=wl.shape_text())
                got.append(r)
            for r in got:
                log(f"  {variant:<10} {r['status']:<8} median {r.get('median_ms', '')} ms "
                    f"extra {r.get('extra_mem_mib', '')} MiB {r.get('note', '')}")
            rows += got
    return rows


# ---------------------------------------------------------------------------- csv

def read_csv(path: Path) -> List[Row]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_csv(path: Path, new_rows: Iterable[Row], whole_key: bool = True) -> List[Row]:
    """Write ``new_rows`` into the CSV at path and return all rows. ``whole_key``: the old
    rows of the same (device, torch_version, lpl_ext_version) key are all replaced (a full
    run); otherwise only those of the same (key, bench, workload, variant) (a subset run
    adds to the earlier rows of its key). Rows of other keys are always kept."""
    new_rows = list(new_rows)

    def ident(r: Row) -> tuple:
        fields = KEY_FIELDS if whole_key else KEY_FIELDS + ("bench", "workload", "variant")
        return tuple(str(r.get(k, "")) for k in fields)

    replaced = {ident(r) for r in new_rows}
    rows = [r for r in read_csv(path) if ident(r) not in replaced] + new_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    return rows


def parse_list(text: Optional[str], allowed: Sequence[str], what: str) -> List[str]:
    """Comma-separated choice list; raises ValueError naming ``what`` on unknown items."""
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {bad}; expected a subset of {list(allowed)}")
    return items


if __name__ == "__main__":  # the worker side of run_in_worker
    for _row in _call(sys.argv[1], json.loads(sys.argv[2])):
        print(JSON_PREFIX + json.dumps(_row), flush=True)
