"""Smoke tests of the benchmark harness (benchmarks/): the quick suite runs end to end
through its worker processes and writes a well-formed CSV, RESULTS.md and PNG; the
benchmarked variants compute the same loss and gradient (so the timings compare like
with like); the CSV keeps other machines' rows. Timings are never asserted."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bench_head, bench_outlier, common  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from reference import ref_feature_distance, ref_outlier_mask  # noqa: E402


def _run_all(out: Path, *args: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # micro shapes: threads only add noise here
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out-dir", str(out), *args],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_rows(rows: list[dict], expected: set) -> None:
    assert {(r["bench"], r["workload"], r["variant"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok", r
        p20, med, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert float(r["extra_mem_mib"]) >= 0
        assert r["device"] and r["torch_version"] == torch.__version__
        if r["bench"] != "decoder":
            assert float(r["floor_ms"]) > 0 and float(r["bandwidth_gbs"]) > 0


def test_quick_suite_end_to_end(tmp_path: Path) -> None:
    """run_all --quick --inprocess over every bench (eager and lpl_ext: torch.compile's
    cold compile is too slow for the smoke budget, and what it compiles is the eager
    function) gives one ok row per (bench, workload, variant) and the three files."""
    rows = _run_all(tmp_path, "--inprocess", "--variants", "eager,lpl_ext")
    expected = {("head", wl.name, v) for wl in bench_head.workloads("quick") for v in ("eager", "lpl_ext")}
    expected |= {("outlier", wl.name, v) for wl in bench_outlier.workloads("quick") for v in ("eager", "lpl_ext")}
    expected |= {("decoder", "tiny_vae_64px_b1", v) for v in ("reference", "lpl_ext")}
    _check_rows(rows, expected)
    md = (tmp_path / "RESULTS.md").read_text()
    for title in ("Loss head", "Outlier mask alone", "get_loss + backward", "Targets (CPU)"):
        assert title in md
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_subprocess_protocol(tmp_path: Path) -> None:
    """The default path: each variant in a fresh worker process reporting over stdout."""
    rows = _run_all(tmp_path, "--only", "outlier", "--variants", "lpl_ext")
    _check_rows(rows, {("outlier", wl.name, "lpl_ext") for wl in bench_outlier.workloads("quick")})
    assert "in-process" not in rows[0]["note"]


@pytest.mark.parametrize("norm", ["default", "shared", "batch", "none"])
@pytest.mark.parametrize("outliers", [False, True])
def test_benchmarked_heads_agree(norm: str, outliers: bool) -> None:
    """The eager head of the benchmark, the spec oracle of tests/reference.py and
    lpl_ext's head give the same loss and gradient on a micro pyramid."""
    pytest.importorskip("lpl_ext")
    wl = bench_head.HeadWorkload(32, 2, tuple(range(5)), norm, "mse", outliers, dtype="float64")
    xs, ys = bench_head.make_inputs(wl, "cpu", seed=3)
    oracle = 0
    for i, x, y in zip(wl.layers, xs, ys):
        mask = None
        if wl.masked(i):  # vectorized mask, checked against ref_outlier_mask below
            mask = bench_head.reference_outlier_keep(y, *bench_head.outlier_windows(bench_head.OUTLIER_DOWN_FACTOR[i]))
        oracle = oracle + ref_feature_distance(x, y, mask, norm, "mse", bench_head.layer_weight(i, True))
    oracle = oracle / len(xs)
    grads = []
    for head in (bench_head.reference_head, bench_head.lpl_ext_head):
        for x in xs:
            x.grad = None
        loss = head(xs, ys, wl=wl)
        torch.testing.assert_close(loss, oracle.detach(), rtol=1e-9, atol=1e-12)
        loss.sum().backward()
        grads.append([x.grad.clone() for x in xs])
    for g_ref, g_ext in zip(*grads):
        torch.testing.assert_close(g_ext, g_ref, rtol=1e-7, atol=1e-12)


def test_outlier_keep_matches_oracle() -> None:
    """The vectorized benchmark mask equals the per-plane oracle."""
    y = torch.randn(2, 8, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y.view(-1)[::37] *= 8
    for closing, opening in ((3, 5), (1, 3)):
        keep = bench_head.reference_outlier_keep(y, closing, opening).bool()
        assert torch.equal(keep, ref_outlier_mask(y, 0.02, 2.0, closing, opening))


def test_csv_merge_replaces_only_its_key(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    env_a = dict(device="cpu A", torch_version="1", lpl_ext_version="0.1", threads=2)
    env_b = dict(env_a, device="GPU B")
    common.merge_csv(path, [common.base_row(env_a, "head", "w", "eager"), common.base_row(env_b, "head", "w", "eager")])
    new = common.base_row(env_a, "head", "w2", "lpl_ext")
    rows = common.merge_csv(path, [new])  # a full run replaces its whole key
    assert sorted((r["device"], r["workload"]) for r in rows) == [("GPU B", "w"), ("cpu A", "w2")]
    again = dict(common.base_row(env_a, "head", "w2", "lpl_ext"), note="re-measured")
    rows = common.merge_csv(path, [again, common.base_row(env_a, "head", "w3", "eager")], whole_key=False)
    assert sorted((r["device"], r["workload"], r["note"]) for r in rows) == [
        ("GPU B", "w", ""), ("cpu A", "w2", "re-measured"), ("cpu A", "w3", "")]


def test_timing_quantiles() -> None:
    t = common.Timing([0.004, 0.001, 0.003, 0.002, 0.005], first_call_s=0.01)
    assert math.isclose(t.median_ms, 3.0)
    assert math.isclose(t.quantile_ms(0.2), 1.8)
    assert math.isclose(t.quantile_ms(0.8), 4.2)


@pytest.mark.parametrize("script, args, agree", [
    ("bench_layer_quick.py", ["--shape", "2", "5", "9", "7", "--norm", "default", "--mask"], "max rel. difference"),
    ("bench_outlier_quick.py", ["--shape", "1", "3", "20", "24"], "masks identical: True"),
])
def test_quick_single_layer_scripts(script: str, args: list, agree: str) -> None:
    """The one-layer quick comparisons (the figures quoted for issues 2 and 3) run and
    report agreement between the two formulations."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--reps", "1"],
                          cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "speedup" in proc.stdout and agree in proc.stdout
    if script == "bench_layer_quick.py":
        diffs = proc.stdout.split("max rel. difference:")[1]
        loss_err = float(diffs.split("loss")[1].split(",")[0])
        grad_err = float(diffs.split("grad")[1].split()[0])
        assert loss_err < 1e-5 and grad_err < 1e-5, proc.stdout
