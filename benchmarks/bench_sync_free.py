"""LPLObjective: default selection (one host sync, decodes only the samples below the
threshold) vs ``sync_free=True`` (no sync; decodes the whole batch, or ``capacity``
slots) — time and peak memory of objective + backward per training step.

Batch of N latents with a fixed timestep pattern in which a quarter of the samples is
below ``t_threshold=200`` (the 20-25% a uniform timestep draw gives), epsilon
prediction, SDXL noise schedule, the objective's defaults (shared norm, pow_law,
outliers, 4 up blocks, per-module decoder checkpointing). The VAE is random (SDXL
architecture, or the tiny one of bench_decoder); nothing is downloaded.

    python -m benchmarks.bench_sync_free [--quick] [--device cuda]

Timing: the variants run interleaved in one process (median wall time, and median CPU
time of the process, which a shared machine's load does not inflate); memory: peak
extra RSS (CUDA: max allocated) of one step after a warm-up, each variant alone in a
fresh process. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.bench_decoder import build_vae

BENCH = "sync_free"
VARIANTS = ("default", "sync_free", "capacity")
T_THRESHOLD = 200


@dataclass(frozen=True)
class SyncFreeWorkload:
    resolution: int
    batch: int
    arch: str = "sdxl"  # "sdxl" or "tiny"

    @property
    def name(self) -> str:
        return f"{self.arch}_vae_{self.resolution}px_b{self.batch}"

    @property
    def capacity(self) -> int:
        """The ``capacity`` variant's decoder batch: half the batch (twice the expected
        number of qualifying samples)."""
        return max(1, self.batch // 2)

    def timesteps(self) -> List[int]:
        """A quarter of the batch below the threshold, spread over the batch."""
        pattern = [50, 400, 700, 950]
        return [pattern[i % 4] for i in range(self.batch)]

    def shape_text(self) -> str:
        lat = self.resolution // 8
        below = sum(t < T_THRESHOLD for t in self.timesteps())
        return (f"latents {self.batch}x4x{lat}x{lat}, {self.arch} decoder, {below}/{self.batch} below "
                f"t={T_THRESHOLD}, capacity {self.capacity}")


def workloads(mode: str, device: str = "cpu") -> List[SyncFreeWorkload]:
    if mode == "quick":
        return [SyncFreeWorkload(64, 8, "tiny")]
    if mode == "gpu" or device.startswith("cuda"):
        return [SyncFreeWorkload(64, 8, "tiny"), SyncFreeWorkload(512, 8, "sdxl"), SyncFreeWorkload(1024, 4, "sdxl")]
    return [SyncFreeWorkload(64, 8, "tiny"), SyncFreeWorkload(128, 4, "sdxl")]


def build_objective(variant: str, vae: Any, wl: SyncFreeWorkload) -> Any:
    from lpl_ext import LPLObjective

    kwargs: Dict[str, Any] = dict(t_threshold=T_THRESHOLD)
    if variant == "sync_free":
        kwargs.update(sync_free=True)
    elif variant == "capacity":
        kwargs.update(sync_free=True, capacity=wl.capacity)
    return LPLObjective(vae, **kwargs)


def _setup(wl: SyncFreeWorkload, device: str, variants: Sequence[str]) -> Dict[str, Callable[[], None]]:
    """One training-step closure per variant over the same VAE and batch (objective +
    backward; the prediction's .grad is dropped before each step)."""
    import torch
    from diffusers import DDPMScheduler

    vae = build_vae(wl.arch, device)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    ac = sched.alphas_cumprod.to(device)
    lat = wl.resolution // 8
    gen = torch.Generator(device=device).manual_seed(1)
    z0 = torch.randn(wl.batch, 4, lat, lat, generator=gen, device=device)
    eps = torch.randn(wl.batch, 4, lat, lat, generator=gen, device=device)
    t = torch.tensor(wl.timesteps(), device=device)
    zt = sched.add_noise(z0, eps, t)
    pred = (eps + 0.3 * torch.randn(eps.shape, generator=gen, device=device)).requires_grad_(True)

    def make_step(obj: Any) -> Callable[[], None]:
        def step() -> None:
            pred.grad = None
            lpl, _ = obj(pred, zt, z0, t, prediction_type="epsilon", alphas_cumprod=ac)
            lpl.backward()
        return step

    return {v: make_step(build_objective(v, vae, wl)) for v in variants}


def time_worker(wl: SyncFreeWorkload, device: str, variants: Sequence[str], reps: int) -> List[Dict[str, Any]]:
    """Median wall and CPU (process) time per variant, the variants interleaved round by
    round (rotating the order) so that a load drifting over the run hits all alike. CPU
    time counts the work of every thread of this process and is insensitive to other
    processes competing for the cores."""
    import statistics
    import time

    steps = _setup(wl, device, variants)
    for step in steps.values():  # warm-up (allocator, first-call paths)
        step()
    wall: Dict[str, List[float]] = {v: [] for v in variants}
    cpu: Dict[str, List[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(reps):
        for v in order[r % len(order):] + order[: r % len(order)]:
            common.sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            common.sync(device)
            wall[v].append(time.perf_counter() - w0)
            cpu[v].append(time.process_time() - c0)
    return [{"workload": wl.name, "variant": v, "wall_ms": 1e3 * statistics.median(wall[v]),
             "cpu_ms": 1e3 * statistics.median(cpu[v]), "reps": reps} for v in variants]


def memory_worker(wl: SyncFreeWorkload, device: str, variant: str) -> Dict[str, Any]:
    """Peak extra memory of one step after a warm-up step, alone in this process."""
    step = _setup(wl, device, [variant])[variant]
    step()
    mem = common.PeakMemory(device)
    mem.start()
    step()
    extra = mem.stop()
    return {"workload": wl.name, "variant": variant, "extra_mib": extra / 2**20, "approximate": mem.approximate}


def run(mode: str, device: str, variants: Sequence[str], reps: int, threads: int = 1,
        log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Per workload: one timing process (variants interleaved) and one memory process per
    variant. Returns one merged row per (workload, variant)."""
    rows: List[Dict[str, Any]] = []
    for wl in workloads(mode, device):
        log(f"[{BENCH}] {wl.name}: {wl.shape_text()}")
        base = ["--mode", mode, "--device", device, "--workload", wl.name, "--threads", str(threads)]
        got, failure = common.run_worker("benchmarks.bench_sync_free",
                                         ["--worker", "time", "--variants", ",".join(variants), "--reps", str(reps),
                                          *base])
        timing = {r["variant"]: r for r in got}
        for v in variants:
            mem_rows, mem_failure = common.run_worker("benchmarks.bench_sync_free",
                                                      ["--worker", "memory", "--variants", v, *base])
            row: Dict[str, Any] = {"workload": wl.name, "shape": wl.shape_text(), "variant": v}
            row.update(timing.get(v, {"error": failure or "no timing row"}))
            row.update(mem_rows[0] if mem_rows else {"mem_error": mem_failure or "no memory row"})
            log(f"  {v:<10} wall {row.get('wall_ms', float('nan')):.1f} ms  cpu {row.get('cpu_ms', float('nan')):.1f} ms"
                f"  extra {row.get('extra_mib', float('nan')):.1f} MiB")
            rows.append(row)
    return rows


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: per workload and variant, median wall and CPU time and peak extra memory,
    each also relative to the default."""
    lines = ["| workload | variant | wall ms | CPU ms | CPU vs default | extra MiB | vs default |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {r["workload"]: r for r in rows if r["variant"] == "default"}

    def rel(r: Dict[str, Any], key: str) -> str:
        b = base.get(r["workload"], {})
        if key in r and b.get(key):
            return f"{r[key] / b[key]:.2f}x"
        return ""

    for r in rows:
        lines.append(f"| {r['workload']} | {r['variant']} | {r.get('wall_ms', float('nan')):.0f} | "
                     f"{r.get('cpu_ms', float('nan')):.0f} | {rel(r, 'cpu_ms')} | "
                     f"{r.get('extra_mib', float('nan')):.1f} | {rel(r, 'extra_mib')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="the tiny decoder only (about a minute)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads in the workers (default 1: on a shared machine, idle OpenMP "
                        "threads spinning at barriers would inflate the CPU time)")
    p.add_argument("--worker", choices=("time", "memory"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants = common.parse_list(args.variants, VARIANTS, "variants") if args.variants else list(VARIANTS)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        wl = {w.name: w for w in workloads(args.mode, args.device)}[args.workload]
        if args.worker == "time":
            for row in time_worker(wl, args.device, variants, args.reps):
                common.emit(row)
        else:
            common.emit(memory_worker(wl, args.device, variants[0]))
        return 0
    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "cpu")
    rows = run(mode, args.device, variants, args.reps, args.threads)
    env = common.env_info(args.device)
    print(f"\n{env['device']}, torch {env['torch_version']}, {args.threads} thread(s) per worker\n")
    print(table(rows))
    return 0 if all("wall_ms" in r and "extra_mib" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
