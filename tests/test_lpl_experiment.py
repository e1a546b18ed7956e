"""Tests of tools/lpl_experiment.py: its statistics (Student-t p-values from the incomplete beta function, the
paired test over seeds), the LPL-share calibration, the loss statistics read from metrics.csv, the tables'
verdicts, and (slow) a tiny end-to-end run of the texture suite and its resume path."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "lpl_experiment.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("lpl_experiment_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ex = _load_tool()


# --- Student t and the incomplete beta function -------------------------------------------------------------


@pytest.mark.parametrize("t, df, want", [
    (2.0, 2, 0.183503),     # closed form for df=2: 1 - t / sqrt(2 + t^2)
    (4.303, 2, 0.05),       # the t table's 97.5% quantile for df=2
    (12.706, 1, 0.05),      # ... for df=1
    (2.228, 10, 0.05),      # ... for df=10
    (2.042, 30, 0.05),      # ... for df=30
    (1.96, 1e6, 0.05),      # large df: the normal distribution
    (0.0, 5, 1.0),
])
def test_student_t_p_matches_known_values(t, df, want):
    assert ex.student_t_two_sided_p(t, df) == pytest.approx(want, abs=2e-4)
    assert ex.student_t_two_sided_p(-t, df) == ex.student_t_two_sided_p(t, df)


def test_student_t_p_matches_closed_forms():
    # df=1 (Cauchy): p = 1 - 2/pi atan|t|; df=2: p = 1 - |t| / sqrt(2 + t^2). Both branches of the continued
    # fraction (x below and above (a+1)/(a+b+2)) are crossed by this range of t.
    for t in np.linspace(0.05, 30.0, 60):
        assert ex.student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-9, abs=1e-12)
        assert ex.student_t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9, abs=1e-12)
    assert ex.student_t_two_sided_p(math.inf, 3) == 0.0


def test_incomplete_beta_closed_forms_and_errors():
    for x in np.linspace(0.0, 1.0, 21):
        assert ex.regularized_incomplete_beta(1.0, 3.0, x) == pytest.approx(1 - (1 - x) ** 3, abs=1e-12)
        assert ex.regularized_incomplete_beta(2.5, 1.0, x) == pytest.approx(x ** 2.5, abs=1e-12)
        # symmetry I_x(a, b) = 1 - I_{1-x}(b, a)
        assert ex.regularized_incomplete_beta(3.0, 0.5, x) == pytest.approx(
            1 - ex.regularized_incomplete_beta(0.5, 3.0, 1 - x), abs=1e-12)
    with pytest.raises(ValueError, match="x"):
        ex.regularized_incomplete_beta(1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="a, b"):
        ex.regularized_incomplete_beta(0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="df"):
        ex.student_t_two_sided_p(1.0, 0)


def test_paired_t_test_by_hand():
    off = [1.0, 2.0, 3.0]
    arm = [1.5, 2.4, 3.7]  # differences 0.5, 0.4, 0.7: mean 0.5333, sample std 0.1528
    r = ex.paired_t_test(arm, off)
    d = np.array([0.5, 0.4, 0.7])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert r["mean_diff"] == pytest.approx(d.mean())
    assert r["std_diff"] == pytest.approx(d.std(ddof=1))
    assert r["t"] == pytest.approx(t) and r["df"] == 2
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # df=2 closed form
    assert r["distinguishable"] is (r["p"] < 0.05)
    # pairing matters: the same values unpaired-shuffled give a different test
    assert ex.paired_t_test([3.7, 1.5, 2.4], off)["p"] != pytest.approx(r["p"])
    # no spread: equal -> p 1; a constant non-zero shift -> p 0
    assert ex.paired_t_test(off, off)["p"] == 1.0
    assert ex.paired_t_test([x + 1 for x in off], off)["p"] == 0.0
    one = ex.paired_t_test([1.0], [0.5])
    assert one["p"] is None and not one["distinguishable"]
    with pytest.raises(ValueError, match="same length"):
        ex.paired_t_test([1.0, 2.0], [1.0])


# --- calibration and loss statistics --------------------------------------------------------------------------


def test_calibrated_weight_reaches_the_target_share():
    assert ex.calibrated_weight(0.02, 1e-4, 0.2) == pytest.approx(0.02 / (4 * 1e-4))  # 20%: w = D / (4 L)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, l, share = rng.uniform(1e-3, 1.0), rng.uniform(1e-6, 1e-1), rng.uniform(0.01, 0.9)
        w = ex.calibrated_weight(d, l, share)
        assert ex.lpl_share(d, l, w) == pytest.approx(share, rel=1e-12)
    for bad, name in (((0.02, 1e-4, 1.0), "share"), ((0.0, 1e-4, 0.2), "diffusion_loss"),
                      ((0.02, 0.0, 0.2), "lpl_loss"), ((0.02, math.nan, 0.2), "lpl_loss")):
        with pytest.raises(ValueError, match=name):
            ex.calibrated_weight(*bad)


def test_loss_stats_share_on_the_steps_with_lpl():
    nan = math.nan
    m = {"diffusion_loss": np.array([0.02, 0.02, 0.04, 0.02]),
         "lpl_loss": np.array([nan, 1e-3, 2e-3, nan]),
         "lpl_applied_ratio": np.array([0.0, 0.25, 0.125, 0.0]),
         "elapsed_s": np.array([1.0, 2.0, 3.5, 4.0])}
    s = ex.loss_stats(m, lpl_weight=5.0)
    # steps 2 and 3 had LPL samples: mean D 0.03, mean L 1.5e-3, 5 * 1.5e-3 / (0.03 + 7.5e-3) = 0.2
    assert s["lpl_applied_step_fraction"] == 0.5
    assert s["diffusion_loss_mean_when_applied"] == pytest.approx(0.03)
    assert s["lpl_loss_mean_when_applied"] == pytest.approx(1.5e-3)
    assert s["lpl_share_when_applied"] == pytest.approx(0.2)
    assert s["lpl_share_per_step_mean"] == pytest.approx((5e-3 / 0.025 + 1e-2 / 0.05) / 2)
    assert s["lpl_to_diffusion_when_applied"] == pytest.approx((5e-3 / 0.02 + 1e-2 / 0.04) / 2)
    assert s["s_per_step_median"] == pytest.approx(1.0)
    off = ex.loss_stats({**m, "lpl_loss": np.full(4, nan), "lpl_applied_ratio": np.zeros(4)}, 0.0)
    assert "lpl_share_when_applied" not in off


def _tool_args(*argv: str, steps: int, post_steps: int | None):
    """The tool's parsed arguments with the fields main() fills in."""
    args = ex.build_parser().parse_args(["--out", "x", *argv])
    args.steps, args.post_steps, args.num_examples = steps, post_steps, 256
    return args


def test_arm_flags_fill_in_the_calibrated_weight_and_post_length():
    common = ex.common_flags(_tool_args("--suite", "textures", steps=7, post_steps=40), ex.TEXTURES)
    assert common[common.index("--synthetic_data") + 1] == "textures"
    cal = ex.arm_flags(ex.TEXTURES, "lpl_cal", common, cal_weight=37.5)
    assert ex.lpl_weight_of(cal) == 37.5 and cal[cal.index("--lpl_t_threshold") + 1] == "200"
    rec = ex.arm_flags(ex.TEXTURES, "lpl_rec", common)
    assert ex.lpl_weight_of(rec) == 1.0
    assert ex.lpl_weight_of(ex.arm_flags(ex.TEXTURES, "off", common)) == 0.0
    post = ex.arm_flags(ex.TEXTURES, "lpl_post", common, cal_weight=2.0, post_steps=40)
    # the later --max_train_steps wins in argparse
    assert post[len(post) - 1 - post[::-1].index("--max_train_steps") + 1] == "40"
    # the post-training length counts the pretraining's samples: 1/3 of 800 steps x 32 at batch 8
    assert ex.post_training_steps({"steps": 800, "batch_size": 32}, 1 / 3, 8) == 1067
    assert ex.post_training_steps({"steps": 800, "batch_size": 32}, 0.2, 32) == 160
    with pytest.raises(ValueError, match="calibrated weight"):
        ex.arm_flags(ex.TEXTURES, "lpl_cal", common)
    # the shapes suite passes no --synthetic_data (any trainer version runs it) and keeps its arms
    shapes = ex.common_flags(_tool_args(steps=300, post_steps=None), ex.SHAPES)
    assert "--synthetic_data" not in shapes
    assert list(ex.SHAPES.arms) == ["off", "lpl_w1", "lpl_w2", "lpl_w100", "lpl_w1_t500"]


def _fake_results(off: list[float], arm: list[float]) -> dict:
    """results.json-like dict: band_error_high per seed for off and lpl_cal, other metrics constant."""
    def run(value):
        summary = {k: 1.0 for k in ex.TEXTURES.metrics}
        summary["band_error_high"] = value
        return {"eval": {"summary": summary}, "losses": {"diffusion_loss_mean": 0.02}}

    return {"runs": {"off": {str(s): run(v) for s, v in enumerate(off)},
                     "lpl_cal": {str(s): run(v) for s, v in enumerate(arm)}}}


def test_paired_tests_and_table_verdicts():
    seeds = [0, 1, 2]
    clear = _fake_results([0.50, 0.60, 0.55], [0.40, 0.49, 0.46])   # a steady -0.1: larger than seed noise
    noisy = _fake_results([0.50, 0.60, 0.55], [0.40, 0.70, 0.50])   # differences -0.1, +0.1, -0.05: p 0.81
    close = _fake_results([0.50, 0.60, 0.55], [0.40, 0.55, 0.35])   # -0.1, -0.05, -0.2: t -2.65, p 0.118
    for results, distinguishable in ((clear, True), (noisy, False), (close, False)):
        tests = ex.paired_tests(results, ex.TEXTURES, ["off", "lpl_cal"], seeds)
        r = tests["lpl_cal"]["band_error_high"]
        assert tests["lpl_cal"]["against"] == "off" and r["n"] == 3
        assert r["distinguishable"] is distinguishable, r
        results["arms"] = ex.aggregate(results, ["off", "lpl_cal"], seeds, ex.TEXTURES.metrics)
        results["paired_tests"] = tests
        results["base"] = {"summary": {k: 1.0 for k in ex.TEXTURES.metrics}}
        table = ex.texture_tables(results)
        row = next(line for line in table.splitlines()
                   if line.startswith("| LPL calibrated") and "| band error high |" in line)
        verdict = "larger than seed noise" if distinguishable else "not distinguishable from seed noise"
        assert verdict in row, row
    t = close["paired_tests"]["lpl_cal"]["band_error_high"]["t"]
    assert t == pytest.approx(-2.6458, abs=1e-3)
    assert close["paired_tests"]["lpl_cal"]["band_error_high"]["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    assert clear["arms"]["lpl_cal"]["band_error_high"]["mean"] == pytest.approx(np.mean([0.40, 0.49, 0.46]))
    # post arms are paired with each other, not with off
    post = {"runs": {a: _fake_results([1, 2], [1, 2])["runs"]["off"] for a in ("off", "off_post", "lpl_post")}}
    assert ex.paired_tests(post, ex.TEXTURES, ["off", "lpl_post", "off_post"], [0, 1])["lpl_post"]["against"] \
        == "off_post"


def test_trained_from_reads_the_trainers_log(tmp_path):
    (tmp_path / "train.log").write_text(
        "2026-12-01 16:25:17,803 INFO train_sdxl_lpl: [RANK 0] offline demo: tiny SDXL pipeline at "
        "/x/cache/tiny-sdxl-textures-7930b474a0-seed0\nsteps: 100%\n")
    assert ex.trained_from(tmp_path) == "/x/cache/tiny-sdxl-textures-7930b474a0-seed0"
    (tmp_path / "train.log").write_text("no such line\n")
    assert ex.trained_from(tmp_path) is None


def test_arms_outside_the_suite_are_rejected():
    with pytest.raises(SystemExit):
        ex.main(["--suite", "textures", "--out", "/tmp/never_written", "--arms", "lpl_w100"])


# --- end to end (slow) ----------------------------------------------------------------------------------------


def _run_tool(out: Path, steps: int = 2, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(TOOL), "--suite", "textures", "--out", str(out), "--steps", str(steps),
           "--seeds", "0", "1", "--arms", "off", "lpl_cal", "--eval_images", "1", "--eval_prompts", "2",
           "--cal_batches", "1", "--probe_batches", "1", "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def textures_run(tmp_path_factory):
    pytest.importorskip("lpl_ext.demo.textures")
    out = tmp_path_factory.mktemp("lpl_textures")
    return out, _run_tool(out)


@pytest.mark.slow
def test_textures_suite_smoke(textures_run):
    out, proc = textures_run
    results = json.loads((out / "results.json").read_text())
    cal = json.loads((out / "calibration.json").read_text())
    assert results["calibration"] == cal
    # the calibrated weight is the one the lpl_cal runs trained with, and its probe hits the target share
    assert cal["share_at_calibrated_weight"] == pytest.approx(0.2)
    for s in ("0", "1"):
        for arm in ("off", "lpl_cal"):  # every run fine-tuned the experiment's base pipeline
            assert results["runs"][arm][s]["trained_from"] == results["base_pipeline"]
        flags = results["runs"]["lpl_cal"][s]["flags"]
        assert ex.lpl_weight_of(flags) == pytest.approx(cal["calibrated_weight"])
        assert flags[flags.index("--synthetic_data") + 1] == "textures"
        assert "--no_use_lpl" in results["runs"]["off"][s]["flags"]
    for key in ex.TEXTURES.metrics:
        assert results["arms"]["off"][key]["n"] == 2, key
        assert key in results["paired_tests"]["lpl_cal"]
    assert results["paired_tests"]["lpl_cal"]["seeds"] == [0, 1]
    assert "lpl_share_when_applied" in results["arms"]["lpl_cal"] or \
        results["arms"]["lpl_cal"].get("lpl_applied_step_fraction") is None  # 2 steps may draw no t < 200
    for name in ("results.md", "textures_samples.png", "textures_spectra.png"):
        assert (out / name).stat().st_size > 0, name
    assert "not distinguishable from seed noise" in (out / "results.md").read_text() or \
        "larger than seed noise" in (out / "results.md").read_text()
    # the trainer's own output is in each run's train.log, its samples written by save_validation_images
    assert "runs:" in proc.stderr  # the tqdm bar over runs
    for arm in ("off", "lpl_cal"):
        run_dir = out / "runs" / arm / "seed0"
        assert (run_dir / "train.log").stat().st_size > 0 and (run_dir / "metrics.csv").is_file()
        manifest = json.loads((run_dir / ex.EVAL_MANIFEST).read_text())
        assert len(manifest["prompts"]) == 2 and all((run_dir / f[0]).is_file() for f in manifest["files"])


@pytest.mark.slow
def test_textures_suite_resumes(textures_run):
    out, _ = textures_run
    logs = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed*/train.log")}
    assert len(logs) == 4
    (out / "runs" / "off" / "seed1" / ex.DONE_MARKER).unlink()  # as if interrupted during that run
    proc = _run_tool(out)
    assert "4 runs (3 already done)" in proc.stdout
    changed = sorted(str(p.relative_to(out)) for p, t in logs.items() if p.stat().st_mtime_ns != t)
    assert changed == [os.path.join("runs", "off", "seed1", "train.log")]
    assert (out / "runs" / "off" / "seed1" / ex.DONE_MARKER).is_file()
    assert "calibration probe" not in proc.stdout  # the probe's result is reused too
    # finished runs trained with other flags are not mixed into a results table
    clash = _run_tool(out, steps=3, expect_rc=1)
    assert "was trained with other flags" in clash.stderr
    # nor are results of another base pipeline (new shipped assets make a new cache folder)
    record = out / "base_pipeline.txt"
    assert record.read_text().strip() == Path(json.loads((out / "results.json").read_text())["base_pipeline"]).name
    record.write_text("tiny-sdxl-textures-other\n")
    other = _run_tool(out, expect_rc=1)
    assert "holds results of the base pipeline tiny-sdxl-textures-other" in other.stderr
