"""The CPU-side parts of the prepared GPU check (benchmarks/gpu_check.py): arguments, the
row plan, the minimal-bytes floor and the report."""

from __future__ import annotations

import pytest

from benchmarks import gpu_check as gc


def test_arguments_defaults_and_errors(capsys):
    args = gc.parse_args(["--out", "x"])
    assert args.steps == gc.STEPS and args.reps == 20 and args.out == "x" and not args.dry_run
    assert gc.parse_args(["--steps", "bench, tests"]).steps == ["bench", "tests"]
    for bad, msg in ((["--steps", "bench,fly"], "--steps: unknown step(s) 'fly'"), (["--steps", ","], "(none given)"),
                     (["--reps", "0"], "--reps: must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
        assert msg in capsys.readouterr().err


def test_plan_covers_every_norm_mask_dtype_and_shape():
    rows = gc.plan_rows()
    fd = [r for r in rows if r.op == "feature_distance"]
    om = [r for r in rows if r.op == "outlier_mask"]
    assert len(fd) == 3 * 2 * 4 * 2 and len(om) == 3 * 2
    assert {(r.shape, r.dtype, r.norm, r.masked) for r in fd} == {
        (s, d, n, m) for s in gc.SHAPES for d in gc.DTYPES for n in gc.NORMS for m in (False, True)}
    assert {(2, 512, 256, 256), (1, 128, 1024, 1024), (1, 512, 128, 128)} == {r.shape for r in om}


def test_minimal_bytes():
    n = 2 * 512 * 256 * 256
    assert gc.min_bytes("feature_distance", (2, 512, 256, 256), "float32", False) == n * 12
    assert gc.min_bytes("feature_distance", (2, 512, 256, 256), "bfloat16", True) == n * 7
    assert gc.min_bytes("outlier_mask", (1, 128, 1024, 1024), "float32", False) == 128 * 2**20 * 5
    with pytest.raises(ValueError, match="op: unknown option 'copy'"):
        gc.min_bytes("copy", (1,), "float32", False)


def test_report_numbers_and_failures():
    row = gc.BenchRow("feature_distance", (1, 1, 1000, 1000), "float32", "shared", False, median_ms=2.0, status="ok")
    assert row.gbs == pytest.approx(12e6 / 2e-3 / 1e9)  # 6 GB/s
    report = gc.Report(env={"gpu": "Test GPU, 999.1"}, copy_gbs=12.0, rows=[row, gc.BenchRow("outlier_mask", (1, 2, 3, 4), "bfloat16")],
                       steps=[gc.StepResult("tests-cubin", "failed", 12.3, "1 failed | 5 passed", "E   boom")],
                       mask_checks=["1x2x3x4 bfloat16: identical across runs: True; identical to the CPU: True"])
    md = gc.render_report(report)
    assert "- **gpu**: Test GPU, 999.1" in md
    assert "| tests-cubin | failed | 12 | 1 failed / 5 passed |" in md  # a '|' never breaks the table
    # floor at 12 GB/s is 1 ms for 12 MB, so 2 ms is 2x the floor
    assert "| feature_distance | 1x1x1000x1000 | float32 | shared | no | 2.000 | 6.0 | 2.00 | ok |" in md
    assert "| outlier_mask | 1x2x3x4 | bfloat16 | - | no | - | - | - | not run |" in md
    assert "## Log tail: tests-cubin" in md and "E   boom" in md
    assert "identical to the CPU: True" in md


def test_dry_run_writes_the_report(tmp_path):
    assert gc.main(["--dry-run", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run: nothing executed" in md and md.count("| feature_distance |") == 48


def test_failed_step_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "step_tests", lambda out: [gc.StepResult("tests-cubin", "failed", 1.0, "1 failed")])
    assert gc.main(["--steps", "tests", "--out", str(tmp_path)]) == 1
    assert "| tests-cubin | failed |" in (tmp_path / "gpu_check.md").read_text()
