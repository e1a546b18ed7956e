"""The CPU-side parts of the prepared GPU check (benchmarks/gpu_check.py): arguments, the
time budget, the row plan, the report written after every step, and a dry run of the
bench step's real code at micro shapes on the CPU."""

from __future__ import annotations

import pytest

from benchmarks import bench_head
from benchmarks import gpu_check as gc
from lpl_ext import _C


def test_arguments_defaults_and_errors(capsys):
    args = gc.parse_args(["--out", "x"])
    assert args.steps == gc.STEPS and args.reps == 10 and args.out == "x" and not args.dry_run
    # by default the current kernels and the 0.2 ones, side by side (docs/cuda.md, "Kernel sets")
    assert args.kernel_envs == [(("LPL_EXT_KERNEL_SET", "v2"),), (("LPL_EXT_KERNEL_SET", "v1"),)]
    assert args.budget_s == gc.DEFAULT_BUDGET_S
    assert gc.parse_args(["--kernel-env", ""]).kernel_envs == [()]
    assert gc.parse_args(["--steps", "bench, tests"]).steps == ["bench", "tests"]
    assert gc.parse_args(["--kernel-env", "LPL_X=old,new"]).kernel_envs == [(("LPL_X", "old"),), (("LPL_X", "new"),)]
    for bad, msg in ((["--steps", "bench,fly"], "--steps: unknown step(s) 'fly'"), (["--steps", ","], "(none given)"),
                     (["--reps", "0"], "--reps: must be >= 1, got 0"), (["--budget-s", "0"], "--budget-s: must be > 0"),
                     (["--kernel-env", "LPL_X"], "--kernel-env: expected NAME=VALUE")):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
        assert msg in capsys.readouterr().err


def test_the_whole_check_fits_one_call_of_about_8_minutes():
    """The device tool lends 15 minutes per issue (start included), at most 10 per call: the
    step shares add up to at most the budget, and the budget to at most 8 minutes."""
    assert sum(gc.STEP_SHARE_S.values()) <= gc.DEFAULT_BUDGET_S + 30 and gc.DEFAULT_BUDGET_S <= 8 * 60
    now = [0.0]
    clock = gc.Clock(100.0, now=lambda: now[0])
    assert clock.allot("bench") == 100.0 and clock.allot("sanitizer") == gc.STEP_SHARE_S["sanitizer"]
    now[0] = 95.0
    assert clock.left() == 5.0 and clock.allot("build") == 5.0
    now[0] = 120.0
    assert clock.left() == 0.0 and clock.allot("tests") == 0.0


def test_plan_puts_the_pyramid_head_first_and_covers_variants_norms_and_kernel_envs():
    envs = gc.parse_kernel_env("LPL_X=old,new")
    plan = gc.bench_plan(False, envs)
    first = plan[:8]
    assert [(i.bench, i.workload.outliers, i.label) for i in first] == [
        ("head", True, "lpl_ext[LPL_X=old]"), ("head", True, "lpl_ext[LPL_X=new]"), ("head", True, "eager"),
        ("head", True, "compile"), ("head", False, "lpl_ext[LPL_X=old]"), ("head", False, "lpl_ext[LPL_X=new]"),
        ("head", False, "eager"), ("head", False, "compile")]
    for item in first:
        assert (item.workload.resolution, item.workload.batch, item.workload.layers, item.workload.dtype) == (
            1024, 4, bench_head.PYRAMID, "float32")
    outliers = [i for i in plan if i.bench == "outlier"]
    assert {i.workload.layers for i in outliers} == {(2,), (3,), (4,)}
    assert {i.workload.norm for i in plan if i.bench == "head"} == set(_C.NORMS)
    dry = gc.bench_plan(True, [()])
    assert all(i.workload.resolution == 32 for i in dry if i.bench == "head")


def test_report_numbers_and_failures():
    report = gc.Report(env={"gpu": "Test GPU, 999.1"}, copy_gbs=12.0,
                       rows=[{"bench": "head", "workload": "w", "variant": "lpl_ext", "median_ms": 2.0, "p20_ms": 1.9,
                              "p80_ms": 2.2, "extra_mem_mib": 10.0, "floor_ms": 1.0, "time_over_floor": 2.0,
                              "status": "ok"},
                             {"bench": "outlier", "workload": "v", "variant": "eager", "status": "skipped",
                              "note": "over the time budget"}],
                       steps=[gc.StepResult("tests-cubin", "failed", 12.3, "1 failed | 5 passed", "E   boom")],
                       mask_checks=["w: identical across runs: True; identical to the CPU: True"])
    md = gc.render_report(report)
    assert "- **gpu**: Test GPU, 999.1" in md
    assert "| tests-cubin | failed | 12 | 1 failed / 5 passed |" in md  # a '|' never breaks the table
    assert "| head | w | lpl_ext | 2.000 | 1.90-2.20 | 10.0 | 1.000 | 2.00 | ok |" in md
    assert "| outlier | v | eager | - | - | - | - | - | skipped (over the time budget) |" in md
    assert "## Log tail: tests-cubin" in md and "E   boom" in md
    assert "identical to the CPU: True" in md


def test_report_is_on_disk_after_every_step(tmp_path, monkeypatch):
    """A call cut short keeps the steps it finished: when a step starts, the report already
    holds every earlier one; a failed step fails the run."""
    seen = []

    def tests_step(out, clock, dry):
        seen.append((tmp_path / "gpu_check.md").read_text())
        return [gc.StepResult("tests-cubin", "failed", 1.0, "1 failed")]

    def sanitizer_step(out, clock, dry):
        seen.append((tmp_path / "gpu_check.md").read_text())
        return [gc.StepResult("sanitizer-memcheck", "passed", 1.0, "ok")]

    monkeypatch.setattr(gc, "step_tests", tests_step)
    monkeypatch.setattr(gc, "step_sanitizer", sanitizer_step)
    assert gc.main(["--steps", "build,tests,sanitizer", "--dry-run", "--out", str(tmp_path)]) == 1
    assert "| build | skipped |" in seen[0] and "tests-cubin" not in seen[0]
    assert "| tests-cubin | failed |" in seen[1]
    assert "| sanitizer-memcheck | passed |" in (tmp_path / "gpu_check.md").read_text()


def test_dry_run_bench_measures_real_rows_and_checks_masks(tmp_path, monkeypatch):
    """The bench step's own code at micro shapes on the CPU (the plan cut to one lpl_ext and
    one eager row to keep the test short; torch.compile is covered by tests/test_compile.py):
    times, floors and the mask checks come out."""
    full = gc.bench_plan(True, [()])
    monkeypatch.setattr(gc, "bench_plan", lambda dry, envs: full[:2])
    rc = gc.main(["--steps", "bench", "--dry-run", "--reps", "1", "--out", str(tmp_path)])
    md = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| head |")]
    assert len(rows) == 2, md
    assert rows[0].startswith("| head | 32px_b2_pyramid_shared_mse_out | lpl_ext |") and rows[0].endswith("| ok |")
    assert rows[1].startswith("| head | 32px_b2_pyramid_shared_mse_out | eager |") and rows[1].endswith("| ok |")
    assert all(" - |" not in r.split("|")[4] for r in rows)  # a median time in every row
    assert "identical across runs: True; identical to the CPU: True" in md
    assert rc == 0 and "| bench | passed |" in md


def test_bench_rows_past_the_budget_are_marked_skipped():
    report = gc.Report()
    args = gc.parse_args(["--dry-run", "--reps", "1"])
    step = gc.step_bench(report, args, gc.Clock(0.0), lambda: None)
    assert report.rows and all(r["status"] == "skipped" and r["note"] == "over the time budget" for r in report.rows)
    assert report.mask_checks == ["skipped: over the time budget"]
    assert step.status == "passed" and step.summary.startswith("0 rows ok")
