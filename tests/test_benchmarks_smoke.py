"""Smoke tests of the benchmark harness (benchmarks/): the quick suite runs end to end
through its worker processes and writes a well-formed CSV, RESULTS.md and PNG; the
one-layer comparisons and the printed benches (sync_free, vae_memory, loss_scale) run and
report what they exist for; the benchmarked variants compute the same loss and gradient
(so the timings compare like with like); the CSV keeps other machines' rows. Timings are
never asserted."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bench_decoder, bench_head, common, run_all  # noqa: E402

import reference as ref  # noqa: E402  (tests/ is on sys.path: conftest.py)


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
    """run_all --quick --inprocess over every CSV bench (eager, reference and lpl_ext:
    torch.compile's cold compile is too slow for the smoke budget, and what it compiles is
    the eager function) gives one ok row per (bench, workload, variant) and the three files."""
    rows = _run_all(tmp_path, "--inprocess", "--variants", "eager,reference,lpl_ext")
    expected = {(b, wl.name, v) for b in ("head", "outlier") for wl in bench_head.workloads(b, "quick")
                for v in ("eager", "lpl_ext")}
    expected |= {("decoder", "tiny_vae_64px_b1", v) for v in ("reference", "lpl_ext")}
    _check_rows(rows, expected)
    md = (tmp_path / "RESULTS.md").read_text()
    for title in ("Loss head", "Outlier mask alone", "get_loss + backward", "Targets (CPU)"):
        assert title in md
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_subprocess_protocol(tmp_path: Path) -> None:
    """The default path: each variant in a fresh worker process reporting over stdout."""
    rows = _run_all(tmp_path, "--only", "outlier", "--variants", "lpl_ext")
    _check_rows(rows, {("outlier", wl.name, "lpl_ext") for wl in bench_head.workloads("outlier", "quick")})
    assert "in-process" not in rows[0]["note"]


def test_printed_benches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """sync_free (timing and memory workers), vae_memory (one worker per variant) and
    loss_scale give their rows: every variant measured, the reference_compat loss equal to
    the restatement's (in both), post_quant_conv moving lpl_ext's scale away from it. The
    workers run in this process (spawning six would cost ~30 s; test_worker_subprocess_protocol
    covers the processes), their arguments and rows passed through JSON as a worker's are."""
    calls = []

    def in_process(target: str, timeout_s: float = 1800.0, **kwargs):
        calls.append(target)
        return json.loads(json.dumps(common._call(target, json.loads(json.dumps(kwargs))))), ""

    monkeypatch.setattr(common, "run_in_worker", in_process)
    out = tmp_path / "printed.json"
    threads = torch.get_num_threads()
    try:
        assert run_all.main(["--quick", "--only", "sync_free,vae_memory,loss_scale", "--variants",
                             "reference,compat,default,capacity", "--reps", "1", "--res", "64", "--tiny",
                             "--batch", "2", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the sync_free workers set theirs
    assert sorted(set(calls)) == [f"benchmarks.bench_decoder:{f}" for f in ("sync_free_memory", "sync_free_time",
                                                                            "vae_memory")]
    rows = json.loads(out.read_text())
    sync_free = [r for r in rows if "wall_ms" in r]
    assert [(r["workload"], r["variant"]) for r in sync_free] == [("tiny_vae_64px_b8", v) for v in ("default", "capacity")]
    assert all(r["cpu_ms"] > 0 and r["extra_mib"] >= 0 for r in sync_free)
    memory = [r for r in rows if "rss_peak_mib" in r]
    assert [r["variant"] for r in memory] == ["reference", "compat"]
    assert all(r["rss_peak_mib"] >= r["rss_before_mib"] > 0 and r["grad_abs_sum"] > 0 for r in memory)
    assert memory[1]["loss"] == pytest.approx(memory[0]["loss"], rel=1e-5)  # compat: the reference's loss
    scale = [r for r in rows if "sigma" in r]
    assert [r["sigma"] for r in scale] == list(bench_decoder.SIGMAS)
    for r in scale:
        assert r["reference_loss"] == pytest.approx(r["restatement_loss"], rel=1e-5)
        assert r["loss_ratio"] == pytest.approx(r["lpl_ext_loss"] / r["reference_loss"], rel=1e-12)
        assert 0 < r["loss_ratio"] < 10 and 0 < r["grad_ratio"] < 10
        assert r["loss_ratio"] != pytest.approx(1.0, abs=1e-3)  # post_quant_conv does change the scale
    text = capsys.readouterr().out
    assert "| sigma |" in text and "| workload | variant | wall ms |" in text


def test_layer_comparisons(capsys: pytest.CaptureFixture) -> None:
    """run_all --layer: the one-layer comparisons run and report agreement between the
    eager formulation and lpl_ext."""
    assert run_all.main(["--layer", "2", "5", "9", "7", "--norm", "default", "--mask", "--reps", "1"]) == 0
    text = capsys.readouterr().out
    diffs = text.split("max rel. difference:")[1]
    assert float(diffs.split("loss")[1].split(",")[0]) < 1e-5
    assert float(diffs.split("grad")[1].split()[0]) < 1e-5
    assert run_all.main(["--only", "outlier", "--layer", "1", "3", "20", "24", "--reps", "1"]) == 0
    assert "masks identical: True" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_all.main(["--only", "decoder", "--layer", "1", "3", "20", "24"])


@pytest.mark.parametrize("norm", ref.NORMS)
@pytest.mark.parametrize("outliers", [False, True])
def test_benchmarked_heads_agree(norm: str, outliers: bool) -> None:
    """The eager head of the benchmark, the spec oracle of tests/reference.py and
    lpl_ext's head give the same loss and gradient on a micro pyramid."""
    pytest.importorskip("lpl_ext")
    wl = bench_head.HeadWorkload(32, 2, bench_head.PYRAMID, norm, "mse", outliers, dtype="float64")
    xs, ys = bench_head.make_inputs(wl, "cpu", seed=3)
    oracle = 0
    for i, x, y in zip(wl.layers, xs, ys):
        mask = None
        if wl.masked(i):  # vectorized mask, checked against ref_outlier_mask below
            mask = ref.reference_outlier_keep(y, *ref.outlier_windows(ref.OUTLIER_DOWN_FACTOR[i]))
        oracle = oracle + ref.ref_feature_distance(x, y, mask, norm, "mse", ref.layer_weight(i, True))
    oracle = oracle / len(xs)
    grads = []
    for head in (bench_head.build_callable("head", "eager", wl), bench_head.build_callable("head", "lpl_ext", wl)):
        for x in xs:
            x.grad = None
        loss = head(xs, ys)
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
        keep = ref.reference_outlier_keep(y, closing, opening).bool()
        assert torch.equal(keep, ref.ref_outlier_mask(y, 0.02, 2.0, closing, opening))


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
