"""Every lpl_ext benchmark, one command line.

The CSV suite (benches head, outlier, decoder) regenerates benchmarks/results.csv,
benchmarks/RESULTS.md and benchmarks/plot.png:

    python benchmarks/run_all.py                 # CPU suite (~15 min on 2 cores)
    python benchmarks/run_all.py --device cuda   # GPU suite (1024px, batch 4)
    python benchmarks/run_all.py --quick         # micro shapes, into a temporary folder

Each variant of each comparison runs in its own fresh worker process (CPU peak RSS is
per variant). The copy bandwidth that defines the floors is measured once per run, in
this process, before the workers start. Rows are keyed by (device, torch version,
lpl_ext version): a re-run replaces its own key's rows in results.csv and keeps others
(e.g. GPU rows stay when the CPU suite is re-run).

One layer, the eager formulation vs lpl_ext alternated in this process, with a check that
they agree (``--only outlier``: the outlier mask alone):

    python benchmarks/run_all.py --layer 2 256 256 256 [--norm shared] [--distance mse] [--mask] [--reps 3]
    python benchmarks/run_all.py --only outlier --layer 1 128 512 512 [--dtype float32]

The benches that print a markdown table instead (benchmarks/bench_decoder.py says what
each measures; --json FILE also writes their rows):

    python benchmarks/run_all.py --only sync_free [--quick] [--device cuda] [--reps 5] [--threads 1]
    python benchmarks/run_all.py --only vae_memory [--res 512] [--no-ckpt] [--variants reference,lpl_ext]
    python benchmarks/run_all.py --only loss_scale [--res 128] [--batch 4] [--tiny] [--vae PATH]
    python benchmarks/run_all.py --only emulated_bytes [--res 32]   # bytes the CUDA kernels move, emulated
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_decoder, bench_emulated_bytes, bench_head, common

# bench -> (module with workloads() and measure(), variants)
SUITE = {"head": (bench_head, bench_head.VARIANTS), "outlier": (bench_head, bench_head.VARIANTS),
         "decoder": (bench_decoder, bench_decoder.VARIANTS)}
PRINTED = {"sync_free": bench_decoder.SYNC_FREE_VARIANTS, "vae_memory": bench_decoder.MEMORY_VARIANTS,
           "loss_scale": (), "emulated_bytes": ()}
# RESULTS.md keeps the emulated-bytes table (--only emulated_bytes) from this line on when the suite rewrites it
EMULATED_MARKER = "<!-- emulated bytes: python benchmarks/run_all.py --only emulated_bytes -->"
ALL_VARIANTS = tuple(dict.fromkeys(bench_head.VARIANTS + bench_decoder.VARIANTS + bench_decoder.MEMORY_VARIANTS
                                   + bench_decoder.SYNC_FREE_VARIANTS))
# Targets for lpl_ext's loss head, per device kind.
TARGETS = {
    "cpu": dict(vs_eager=5.0, vs_compile=2.0, over_floor=2.0, extra_over_features=1.25),
    "cuda": dict(vs_eager=10.0, vs_compile=None, over_floor=1.5, extra_over_features=1.25),
}


# ---------------------------------------------------------------------------- helpers

def _f(v: Any) -> Optional[float]:
    try:
        return float(v) if math.isfinite(float(v)) else None
    except (TypeError, ValueError):
        return None


def _key(r: Dict[str, Any]) -> Tuple[str, ...]:
    return tuple(str(r.get(k, "")) for k in common.KEY_FIELDS)


def _ordered(values: List[str], order: Sequence[str]) -> List[str]:
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def _medians(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str], float]:
    return {(r["bench"], r["workload"], r["variant"]): _f(r.get("median_ms")) for r in rows
            if r.get("status") == "ok" and _f(r.get("median_ms"))}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _fmt(x: Optional[float], nd: int = 2, suffix: str = "") -> str:
    if x is None:
        return "–"
    return f"{x:.0f}{suffix}" if abs(x) >= 100 else f"{x:.{nd}f}{suffix}"


# ---------------------------------------------------------------------------- markdown

def _bench_table(rows: List[Dict[str, Any]], bench: str, baseline: str) -> List[str]:
    rows = [r for r in rows if r["bench"] == bench]
    if not rows:
        return []
    med = _medians(rows)
    lines = [
        f"| workload | variant | median ms | p20–p80 ms | × vs {baseline} | floor ms | × floor | extra MiB "
        "| extra / features | first call s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        for v in _ordered([r["variant"] for r in rows if r["workload"] == wl], SUITE[bench][1]):
            r = next(x for x in rows if x["workload"] == wl and x["variant"] == v)
            if r["status"] != "ok":
                lines.append(f"| {wl} | {v} | {r['status']} | | | | | | | | {r.get('note', '')} |")
                continue
            speed = _ratio(med.get((bench, wl, baseline)), med.get((bench, wl, v)))
            lines.append(
                f"| {wl} | {v} | {_fmt(_f(r['median_ms']), 1)} | {_fmt(_f(r['p20_ms']), 1)}–{_fmt(_f(r['p80_ms']), 1)} "
                f"| {_fmt(speed, 2, '×')} | {_fmt(_f(r.get('floor_ms')), 1)} | {_fmt(_f(r.get('time_over_floor')))} "
                f"| {_fmt(_f(r.get('extra_mem_mib')), 0)} | {_fmt(_f(r.get('extra_over_features')))} "
                f"| {_fmt(_f(r.get('first_call_s')), 1)} | {r.get('note', '')} |"
            )
    return lines


def _targets_table(rows: List[Dict[str, Any]], kind: str) -> List[str]:
    t = TARGETS[kind]
    head = [r for r in rows if r["bench"] == "head"]
    med = _medians(head)
    lines = [
        f"Targets ({kind.upper()}): ≥ {t['vs_eager']}× eager"
        + (f", ≥ {t['vs_compile']}× torch.compile" if t["vs_compile"] else "")
        + f", ≤ {t['over_floor']}× the bandwidth floor, extra memory ≤ {t['extra_over_features']}× the bytes"
        " of the two feature tensors. A miss shows the factor still missing.",
        "",
        "| workload | × eager | × compile | × floor | extra / features | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for wl in dict.fromkeys(r["workload"] for r in head):
        r = next((x for x in head if x["workload"] == wl and x["variant"] == "lpl_ext" and x["status"] == "ok"), None)
        if r is None:
            lines.append(f"| {wl} | – | – | – | – | lpl_ext not measured |")
            continue
        m = med[("head", wl, "lpl_ext")]
        ve = _ratio(med.get(("head", wl, "eager")), m)
        vc = _ratio(med.get(("head", wl, "compile")), m)
        of, ex = _f(r.get("time_over_floor")), _f(r.get("extra_over_features"))
        misses = [f"{what} {(goal / v if higher else v / goal):.2f}× {'short' if higher else 'over'}"
                  for what, v, goal, higher in (("eager", ve, t["vs_eager"], True), ("compile", vc, t["vs_compile"], True),
                                                ("floor", of, t["over_floor"], False),
                                                ("memory", ex, t["extra_over_features"], False))
                  if goal and v is not None and (v < goal if higher else v > goal)]
        verdict = "all met" if not misses else "missed: " + ", ".join(misses)
        lines.append(f"| {wl} | {_fmt(ve, 2, '×')} | {_fmt(vc, 2, '×')} | {_fmt(of)} | {_fmt(ex)} | {verdict} |")
    return lines


def write_results_md(path: Path, all_rows: List[Dict[str, Any]], command: str, wall_s: float,
                     current_key: Optional[Tuple[str, ...]], subset: Optional[str] = None) -> None:
    keys = list(dict.fromkeys(_key(r) for r in all_rows))
    if current_key in keys:  # the run just made comes first
        keys.remove(current_key)
        keys.insert(0, current_key)
    out = [
        "# lpl_ext benchmarks",
        "",
        f"Regenerate everything (CSV, this file, plot.png) with `{command}`"
        f" (this run: {wall_s / 60:.1f} min). Raw rows: [results.csv](results.csv); plot: [plot.png](plot.png);",
        "method and profiling notes: [docs/benchmarks.md](../docs/benchmarks.md).",
        "",
        *([f"> **Rows come from subset runs of the grid** (the last with {subset}); the plain command"
           " runs all of it.", ""] if subset else []),
        "- Variants run side by side in the same run, each in a fresh worker process: **eager** (the LPL head"
        " written in plain PyTorch: kthvalue/std/max_pool2d outlier mask vectorized over planes, normalization,"
        " distance, reductions), **compile** (the same function under `torch.compile`, compiled before timing;"
        " *first call s* is the compile + first run) and **lpl_ext** (`lpl_ext.outlier_mask` +"
        " `lpl_ext.feature_distance`). Head rows time forward + backward to the prediction features.",
        "- Times: median and p20–p80 of the timed calls after one warm-up call. *× vs eager*: eager median /"
        " variant median (higher is faster).",
        "- Memory: *extra* = peak minus the level after the inputs exist (CPU: VmHWM of the worker process,"
        " reset through /proc/self/clear_refs after the warm-up; CUDA: max_memory_allocated). It includes"
        " x.grad. *features* = bytes of the prediction + target feature tensors (outlier bench: the target only).",
        "- Floor: bytes that must move (read x and y, write x.grad, read a 1-byte mask on masked layers; outlier"
        " bench: read y, write the mask) / the copy bandwidth measured in the same run (torch `copy_` of"
        " 256 MiB, read + write, fastest of 10). The decoder bench is compute bound: no floor.",
    ]
    if not any(_is_gpu_key(k) for k in keys):
        out.append("- **No GPU was lent to this task: every number below is CPU.** The harness supports CUDA"
                   " (`--device cuda`: 1024px, batch 4, torch.cuda.synchronize timing, max_memory_allocated).")
    out.append("")
    for key in keys:
        rows = [r for r in all_rows if _key(r) == key]
        first = rows[0]
        bw = next((_f(r.get("bandwidth_gbs")) for r in rows if _f(r.get("bandwidth_gbs"))), None)
        kind = "cuda" if _is_gpu_key(key) else "cpu"
        out += [
            f"## {first['device']} — torch {first['torch_version']}, lpl_ext {first['lpl_ext_version']}",
            "",
            f"{first.get('threads', '?')} threads; copy bandwidth {_fmt(bw, 1)} GB/s (each row's own run: "
            "results.csv); measured "
            f"{min(r['timestamp'] for r in rows)[:16].replace('T', ' ')}.",
            "",
            "### Loss head (forward + backward), SDXL feature pyramid",
            "",
            "Workload names: resolution, batch, levels (pyramid = mid, up0..up3), norm, distance,"
            " outliers on (out) / off (noout); pow_law on, float32.",
            "",
            *_bench_table(rows, "head", "eager"),
            "",
            *_targets_table(rows, kind),
            "",
            "### Outlier mask alone (forward)",
            "",
            *_bench_table(rows, "outlier", "eager"),
            "",
            "### Full get_loss + backward through an SDXL-sized AutoencoderKL decoder (random weights)",
            "",
            *_bench_table(rows, "decoder", "reference"),
            "",
        ]
    kept = path.read_text().split(EMULATED_MARKER, 1) if path.is_file() else []
    path.write_text("\n".join(out) + "\n" + (EMULATED_MARKER + kept[1] if len(kept) == 2 else ""))


def _is_gpu_key(key: Tuple[str, ...]) -> bool:
    return "threads)" not in key[0]


# ---------------------------------------------------------------------------- plot

def write_plot(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Four panels of the current run: head time over the floor, head extra memory over
    the feature bytes, outlier-mask time over the floor, decoder time per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"eager": "#d62728", "compile": "#ff7f0e", "lpl_ext": "#2ca02c", "reference": "#d62728"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))

    def bars(ax: Any, bench: str, column: str, title: str, ylabel: str, log: bool, hline: Optional[float]) -> None:
        sel = [r for r in rows if r["bench"] == bench and r["status"] == "ok" and _f(r.get(column))]
        wls = list(dict.fromkeys(r["workload"] for r in sel))
        variants = _ordered([r["variant"] for r in sel], SUITE[bench][1])
        width = 0.8 / max(len(variants), 1)
        for j, v in enumerate(variants):
            xs, ys = [], []
            for i, wl in enumerate(wls):
                r = next((x for x in sel if x["workload"] == wl and x["variant"] == v), None)
                if r:
                    xs.append(i + (j - (len(variants) - 1) / 2) * width)
                    ys.append(_f(r[column]))
            ax.bar(xs, ys, width, label=v, color=colors.get(v))
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels(wls, rotation=40, ha="right", fontsize=7)
        if log:
            ax.set_yscale("log")
        if hline:
            ax.axhline(hline, color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    bars(axes[0, 0], "head", "time_over_floor", "Loss head fwd+bwd: median time / bandwidth floor (dashed: 2x target)",
         "x floor (log)", True, 2.0)
    bars(axes[0, 1], "head", "extra_over_features", "Loss head: peak extra memory / bytes of x and y "
         "(dashed: 1.25x target)", "x feature bytes", False, 1.25)
    bars(axes[1, 0], "outlier", "time_over_floor", "Outlier mask: median time / bandwidth floor", "x floor (log)",
         True, None)
    bars(axes[1, 1], "decoder", "median_ms", "get_loss + backward through SDXL-sized decoder", "median ms", False,
         None)
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"lpl_ext benchmarks — {dev}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------- main

def run_suite(args: argparse.Namespace, benches: Sequence[str], variants: Callable[[Sequence[str]], List[str]],
              log: Callable[[str], None]) -> bool:
    """The CSV suite: rows into results.csv, then RESULTS.md and plot.png. True when no
    row is an error."""
    t_start = time.time()
    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "full")
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.quick:
        out_dir = Path(tempfile.mkdtemp(prefix="lpl_ext_bench_quick_"))
    else:
        out_dir = common.BENCH_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    quick = mode == "quick"
    env = common.env_info(args.device)
    bandwidth = common.copy_bandwidth(args.device, nbytes=(16 << 20) if quick else (256 << 20))
    log(f"{env['device']}, torch {env['torch_version']}, lpl_ext {env['lpl_ext_version']}; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; output in {out_dir}")
    rows: List[Dict[str, Any]] = []
    for bench in benches:
        module, own = SUITE[bench]
        decoder = bench == "decoder"
        default_budget = (0.2 if quick else 20.0) if decoder else (0.2 if quick else 6.0)
        settings = dict(mode=mode, device=args.device, env=env, bandwidth=bandwidth,
                        reps=args.reps or (3 if quick else 5 if decoder else 7),
                        budget=default_budget if args.budget is None else args.budget)
        rows += common.run_grid(bench, f"{module.__name__}:measure", module.workloads(bench, mode), args.filter,
                                variants(own), settings, args.inprocess, log)

    # A --filter run adds to (replaces only its own rows of) the earlier rows of this key.
    all_rows = common.merge_csv(out_dir / "results.csv", rows, whole_key=not args.filter)
    command = "python benchmarks/run_all.py" + (" --device " + args.device if args.device != "cpu" else "")
    if quick:
        command += " --quick"
    subset = f"`--filter '{args.filter}'`" if args.filter else None
    wall = time.time() - t_start
    write_results_md(out_dir / "RESULTS.md", all_rows, command, wall, _key(rows[0]) if rows else None, subset)
    write_plot(out_dir / "plot.png", [r for r in all_rows if rows and _key(r) == _key(rows[0])])
    log(f"wrote {out_dir / 'results.csv'}, {out_dir / 'RESULTS.md'}, {out_dir / 'plot.png'} in {wall / 60:.1f} min")
    return all(r["status"] != "error" for r in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--only", default=None, help=f"comma list of {list(SUITE) + list(PRINTED)} (default: the "
                   "CSV suite)")
    p.add_argument("--variants", default=None, help="comma list; each bench runs those of its variants listed "
                   f"(default all): {list(ALL_VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="micro shapes (smoke run); the suite writes to a "
                   "temporary folder unless --out-dir is given")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (suite: 7, decoder 5, quick 3; "
                   "--layer: 3; sync_free: 5)")
    g = p.add_argument_group("CSV suite")
    g.add_argument("--out-dir", default=None, help="where results.csv, RESULTS.md, plot.png go "
                   "(default: benchmarks/)")
    g.add_argument("--budget", type=float, default=None, help="seconds of timed calls per row (at least 3)")
    g.add_argument("--filter", default=None, help="regular expression: run only the workloads whose name "
                   "matches (a labelled subset; RESULTS.md says so)")
    g.add_argument("--inprocess", action="store_true", help="run the variants in this process (faster smoke "
                   "runs; peak memory is then not isolated per variant)")
    g = p.add_argument_group("one layer (head, outlier)")
    g.add_argument("--layer", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                   help="compare one layer of this shape instead of running the grid")
    g.add_argument("--norm", default="shared", choices=bench_head.ref.NORMS)
    g.add_argument("--distance", default="mse", choices=bench_head.ref.DISTANCES)
    g.add_argument("--mask", action="store_true", help="with lpl_ext.outlier_mask(y) as keep-mask")
    g.add_argument("--dtype", default="float32", choices=list(bench_head.ELEM_SIZE))
    g = p.add_argument_group("sync_free, vae_memory, loss_scale")
    g.add_argument("--threads", type=int, default=1, help="sync_free: torch CPU threads in the workers (default "
                   "1: on a shared machine, idle OpenMP threads spinning at barriers would inflate the CPU time)")
    g.add_argument("--res", type=int, default=None, help="image resolution, latents res/8 (vae_memory: 512, "
                   "loss_scale: 128, emulated_bytes: 32)")
    g.add_argument("--no-ckpt", action="store_true", help="vae_memory: also every variant without checkpointing")
    g.add_argument("--batch", type=int, default=4, help="loss_scale: batch")
    g.add_argument("--seed", type=int, default=0, help="loss_scale: seed")
    g.add_argument("--tiny", action="store_true", help="loss_scale: lpl_ext's tiny pretrained VAE on its "
                   "synthetic shapes")
    g.add_argument("--vae", default=None, help="loss_scale: a local diffusers AutoencoderKL folder")
    g.add_argument("--json", default=None, help="also write the printed benches' rows to this file")
    args = p.parse_args(argv)
    benches = common.parse_list(args.only, list(SUITE) + list(PRINTED), "only") if args.only else (
        ["head"] if args.layer else list(SUITE))
    requested = common.parse_list(args.variants, ALL_VARIANTS, "variants") if args.variants else None
    if args.layer and not set(benches) <= {"head", "outlier"}:
        p.error(f"--layer: compares one layer of the head or outlier bench, not {benches}")
    if "loss_scale" in benches and args.res is not None and (args.res % 8 or args.res < 32):
        p.error(f"--res: expected a multiple of 8 >= 32, got {args.res}")

    def variants(own: Sequence[str]) -> List[str]:
        return [v for v in own if requested is None or v in requested]

    log = functools.partial(print, flush=True)
    if args.layer:
        for bench in benches:
            bench_head.compare_layer(bench, args.layer, args.norm, args.distance, args.mask, args.dtype,
                                     args.reps or 3, log)
        return 0
    ok = True
    if any(b in SUITE for b in benches):
        ok = run_suite(args, [b for b in benches if b in SUITE], variants, log)
    printed: List[Dict[str, Any]] = []
    if "sync_free" in benches:
        mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "full")
        rows = bench_decoder.run_sync_free(mode, args.device, variants(PRINTED["sync_free"]), args.reps or 5,
                                           args.threads, log)
        env = common.env_info(args.device)
        log(f"\n{env['device']}, torch {env['torch_version']}, {args.threads} thread(s) per worker\n")
        log(bench_decoder.sync_free_table(rows))
        ok &= all("wall_ms" in r and "extra_mib" in r for r in rows)
        printed += rows
    if "vae_memory" in benches:
        chosen = variants(PRINTED["vae_memory"])
        rows = bench_decoder.run_vae_memory(chosen, args.res or 512, args.no_ckpt, log)
        ok &= len(rows) == len(chosen) * (2 if args.no_ckpt else 1)
        printed += rows
    if "loss_scale" in benches:
        res = args.res or 128
        rows = bench_decoder.loss_scale(res, args.batch, args.seed, args.tiny, args.vae)
        which = args.vae or ("tiny pretrained VAE, synthetic shapes" if args.tiny else
                             "SDXL VAE config, random weights")
        log(f"{which}; {args.batch}x{res}px; flags {bench_decoder.FLAGS}")
        log(bench_decoder.loss_scale_table(rows))
        printed += rows
    if "emulated_bytes" in benches:
        rows = bench_emulated_bytes.run(args.res or 32, log=log)
        streaming = bench_emulated_bytes.run_streaming(log=log)
        large = bench_emulated_bytes.run_large_planes(log=log)
        log(bench_emulated_bytes.summary_table(rows))
        log(bench_emulated_bytes.streaming_table(streaming))
        log(bench_emulated_bytes.large_plane_table(large))
        log(bench_emulated_bytes.table(rows, args.res or 32))
        printed += rows + streaming + large
    if args.json:
        Path(args.json).write_text(json.dumps(printed, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
