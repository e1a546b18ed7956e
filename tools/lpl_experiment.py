"""LPL on/off experiment in miniature: fine-tune a tiny SDXL base with and without LPL, score the samples.

Every run is ``train_sdxl_lpl.py`` itself (a subprocess with flags; nothing of the trainer is copied): the
same pretrained tiny base, the same built-in data, the same number of steps, learning rate and seeds; the
arms differ only in their LPL flags. After training, each run's saved pipeline samples fixed evaluation
prompts with the same generator seeds (the trainer's ``generate_validation_images``, grids by its
``save_validation_images``), and a metric that reads the pictures scores them. The base itself is scored
the same way (step 0). The probes at the base use the trainer's own data and loss code (``TrainDataset``,
``make_collate``, ``encode_latents``, ``compute_losses``, ``build_lpl_objective``).

Two suites (``--suite``):

- ``shapes`` (default; docs/experiment.md): the flat-colour shapes base ``lpl_ext/demo/assets/tiny_sdxl_base``,
  scored by ``lpl_ext.demo.image_metrics`` (colours, shape, size, shape IoU, edge width).
- ``textures``: the texture base (``ensure_tiny_sdxl(dataset="textures")``, trainer flag
  ``--synthetic_data textures``), scored by ``lpl_ext.demo.texture_metrics`` (band spectrum errors
  low/mid/high against real renderings, recovered period and orientation, edge width, colour error). Arms:

  - ``off``: ``--no_use_lpl``;
  - ``lpl_rec``: the recommended settings, ``--use_lpl --lpl_weight 1.0 --lpl_t_threshold 200`` (as the
    shapes suite's ``lpl_w1``; the other LPL options are the trainer's defaults);
  - ``lpl_cal``: ``--use_lpl --lpl_weight W --lpl_t_threshold 200`` with W calibrated at the base so that the
    weighted LPL term is ``--cal_share`` (20%, as published ports use) of the total loss on the steps where
    LPL applies (:func:`loss_share_probe`, :func:`calibrated_weight`; the probe's numbers are in
    results.json, the share each run achieved is measured from its metrics.csv);
  - opt-in ``lpl_post`` / ``off_post``: the calibrated LPL arm and LPL off for the long end of the paper's
    post-training length, ``--post_fraction`` (1/3) of the base's pretraining, counted in training samples
    (its steps x batch size, from the base's asset record; compared with each other). ``results.json``'s
    ``pretraining`` says which fraction the default arms' steps are.

  Per arm: mean ± std over training seeds, and a paired t-test over seeds against ``off`` (p >= 0.05: not
  distinguishable from seed noise).

Both suites also run a gradient probe per LPL arm (:func:`gradient_probe`: the weighted LPL gradient on the
UNet against the diffusion loss's, at the base).

Outputs under ``--out``: ``runs/<arm>/seed<k>/`` (the trainer's output_dir with its ``train.log``, plus
``eval.json`` and ``eval_samples/``), ``base/``, ``results.json``, ``results.md`` (the tables), and the figures
(shapes: ``experiment_samples.png``, ``experiment_curves.png``; textures: ``textures_samples.png``,
``textures_spectra.png``). Runs already finished in ``--out`` are reused (a run recorded with other trainer
flags than the command gives it is an error, not mixed in), so an interrupted experiment resumes, and a
change of the metric re-scores the saved samples without retraining; so are the base's samples and the
probes' results.

    python tools/lpl_experiment.py --out /tmp/lpl_experiment                  # the shapes experiment
    python tools/lpl_experiment.py --suite textures --out /tmp/lpl_textures   # the texture experiment
    python tools/lpl_experiment.py --out /tmp/x --steps 20 --seeds 0 --arms off lpl_w1   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAL_WEIGHT = "<calibrated>"  # placeholder in arm flags, replaced by the calibrated --lpl_weight
POST_STEPS = "<post>"  # marks arms trained for the post-training length instead of --steps
DONE_MARKER = "experiment_run_done.json"
EVAL_FOLDER = "eval_samples"  # save_validation_images' folder inside each run / base folder
EVAL_MANIFEST = "eval_samples.json"  # which file holds which prompt's images
LPL_REC = ["--use_lpl", "--lpl_weight", "1.0", "--lpl_t_threshold", "200"]


@dataclass(frozen=True)
class Suite:
    """One experiment: its arms (name -> the trainer's LPL flags), labels and defaults."""

    name: str
    synthetic_data: str | None  # --synthetic_data of the trainer (None: not passed; the trainer's default)
    arms: dict[str, list[str]]
    labels: dict[str, str]
    default_arms: tuple[str, ...]
    metrics: tuple[str, ...]  # keys of a run's eval summary, aggregated over seeds
    steps: int
    seeds: tuple[int, ...]
    num_examples: int  # --num_synthetic_examples (0: every distinct example of the set)
    jobs: int
    # Measured seconds per training step (1 thread per run, --jobs runs at a time on the 2 shared cores):
    # LPL off, LPL on (t < 200); and seconds to sample and score one run. For the start-up estimate.
    est_s_per_step: tuple[float, float]
    est_eval_s: float
    pairs: dict[str, str] = field(default_factory=dict)  # arm -> the arm it is paired with (default "off")


SHAPES = Suite(
    name="shapes", synthetic_data=None,
    arms={
        "off": ["--no_use_lpl"],
        "lpl_w1": LPL_REC,
        "lpl_w2": ["--use_lpl", "--lpl_weight", "2.0", "--lpl_t_threshold", "200"],
        "lpl_w100": ["--use_lpl", "--lpl_weight", "100.0", "--lpl_t_threshold", "200"],
        "lpl_w1_t500": ["--use_lpl", "--lpl_weight", "1.0", "--lpl_t_threshold", "500"],
    },
    labels={"base": "base (step 0)", "off": "LPL off", "lpl_w1": "LPL w=1, t<200", "lpl_w2": "LPL w=2, t<200",
            "lpl_w100": "LPL w=100, t<200", "lpl_w1_t500": "LPL w=1, t<500"},
    default_arms=("off", "lpl_w1", "lpl_w2", "lpl_w100", "lpl_w1_t500"),
    metrics=("all_acc", "fg_acc", "bg_acc", "shape_acc", "size_acc", "shape_iou", "edge_width_px", "fg_error",
             "bg_error"),
    steps=300, seeds=(0, 1, 2), num_examples=256, jobs=1,
    # docs/experiment.md: medians on 2 busy cores, 2 runs at a time; ~45 s per run of start-up, sampling and
    # scoring (with these the estimate of its 15 runs is 1910 s; they took 1959 s)
    est_s_per_step=(0.46, 0.66), est_eval_s=45.0,
)

TEXTURES = Suite(
    name="textures", synthetic_data="textures",
    arms={
        "off": ["--no_use_lpl"],
        "lpl_rec": LPL_REC,
        "lpl_cal": ["--use_lpl", "--lpl_weight", CAL_WEIGHT, "--lpl_t_threshold", "200"],
        "lpl_post": ["--use_lpl", "--lpl_weight", CAL_WEIGHT, "--lpl_t_threshold", "200", POST_STEPS],
        "off_post": ["--no_use_lpl", POST_STEPS],
    },
    labels={"base": "base (step 0)", "off": "LPL off", "lpl_rec": "LPL w=1, t<200 (recommended)",
            "lpl_cal": "LPL calibrated (20% share), t<200", "lpl_post": "LPL calibrated, post-training length",
            "off_post": "LPL off, post-training length"},
    default_arms=("off", "lpl_rec", "lpl_cal"),
    metrics=("band_error_low", "band_error_mid", "band_error_high", "band_log_ratio_mid", "band_log_ratio_high",
             "all_ok", "period_ok", "period_rel_error", "orientation_ok", "orientation_error_deg", "colors_ok",
             "color_error", "edge_width_px"),
    # 600 steps: 9 runs, 2 at a time, estimated 33 min + a few of probes and figures on the 2 shared cores
    # (same tiny architecture and 64 px as the shapes: measured 0.44 / 0.60 s per step off / LPL at t<200 on
    # 60-step texture runs with the machine loaded, and ~25 s of start-up per run).
    # num_examples 0: textures.num_distinct_examples(), every pattern, orientation, period and colour pair
    steps=600, seeds=(0, 1, 2), num_examples=0, jobs=2,
    est_s_per_step=(0.46, 0.66), est_eval_s=45.0,
    pairs={"lpl_post": "off_post"},
)
SUITES = {s.name: s for s in (SHAPES, TEXTURES)}
# Start-up estimate of what is not a run: base evaluation, probes, re-scoring, references and figures.
FIXED_OVERHEAD_S = 180.0
# Column names of the texture metrics (texture_metrics.evaluate's keys; *_ok are percentages of the images).
METRIC_LABELS = {
    "band_error_low": "band error low", "band_error_mid": "band error mid", "band_error_high": "band error high",
    "band_log_ratio_mid": "log10 power ratio mid", "band_log_ratio_high": "log10 power ratio high",
    "all_ok": "all right %", "period_ok": "period right %", "period_rel_error": "period rel. error",
    "orientation_ok": "orientation right %", "orientation_error_deg": "orientation error deg",
    "colors_ok": "colours right %", "color_error": "colour error (RGB)", "edge_width_px": "edge width px",
}
# The texture tables: spectrum columns, then what the pictures show (period, orientation, colours, edges).
TEXTURE_TABLE_GROUPS = (
    ("band_error_low", "band_error_mid", "band_error_high", "band_log_ratio_mid", "band_log_ratio_high"),
    ("all_ok", "period_ok", "period_rel_error", "orientation_ok", "orientation_error_deg", "colors_ok",
     "color_error", "edge_width_px"),
)


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes' ``betacf``,
    modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1 (the continued fraction on the side where it converges fast)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"a, b: must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x: must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom: P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    if not df > 0:
        raise ValueError(f"df: must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    if math.isnan(t):
        raise ValueError("t: is NaN")
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: list[float], b: list[float]) -> dict:
    """Paired t-test of ``a`` against ``b`` (the same training seeds, in the same order).

    Returns mean_diff (a - b), std_diff (sample std of the differences), n, t, df, p (two-sided; None when
    n < 2) and ``distinguishable`` (p < 0.05). Differences all equal to zero give t 0, p 1; all equal and
    non-zero give |t| = inf, p 0.
    """
    if len(a) != len(b):
        raise ValueError(f"a, b: paired samples need the same length, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = int(len(d))
    out = {"mean_diff": float(d.mean()) if n else math.nan, "n": n}
    if n < 2:
        return {**out, "std_diff": math.nan, "t": None, "df": None, "p": None, "distinguishable": False}
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t = 0.0 if out["mean_diff"] == 0.0 else math.copysign(math.inf, out["mean_diff"])
    else:
        t = out["mean_diff"] / (sd / math.sqrt(n))
    p = student_t_two_sided_p(t, n - 1)
    return {**out, "std_diff": sd, "t": t, "df": n - 1, "p": p, "distinguishable": p < 0.05}


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (ddof 1; 0 for one value) of the finite values, with their count."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def calibrated_weight(diffusion_loss: float, lpl_loss: float, share: float) -> float:
    """The ``--lpl_weight`` w at which the weighted LPL term is ``share`` of the total loss:
    w L / (D + w L) = share  =>  w = share / (1 - share) * D / L  (D, L: mean diffusion and LPL losses on the
    steps where LPL applies; 20% gives w = D / (4 L))."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share: must be in (0, 1), got {share}")
    if not (math.isfinite(diffusion_loss) and diffusion_loss > 0):
        raise ValueError(f"diffusion_loss: must be finite and > 0, got {diffusion_loss}")
    if not (math.isfinite(lpl_loss) and lpl_loss > 0):
        raise ValueError(f"lpl_loss: must be finite and > 0 (LPL applied to no sample?), got {lpl_loss}")
    return share / (1.0 - share) * diffusion_loss / lpl_loss


def lpl_share(diffusion_loss: float, lpl_loss: float, weight: float) -> float:
    """Share w L / (D + w L) of the weighted LPL term in the total loss."""
    return weight * lpl_loss / (diffusion_loss + weight * lpl_loss)


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


def common_flags(args: argparse.Namespace, suite: Suite) -> list[str]:
    """Trainer flags shared by every arm."""
    flags = [
        "--max_train_steps", str(args.steps),
        "--learning_rate", repr(args.lr),
        "--lr_scheduler", "constant",
        "--train_batch_size", str(args.batch_size),
        "--num_synthetic_examples", str(args.num_examples),
        "--snr_gamma", repr(args.snr_gamma),
        "--num_validation_images", "0",
        "--checkpointing_steps", str(10 * max(args.steps, args.post_steps or 0)),  # no intermediate checkpoints
    ]
    if suite.synthetic_data is not None:
        flags += ["--synthetic_data", suite.synthetic_data]
    return flags + shlex.split(args.trainer_args)


def arm_flags(suite: Suite, arm: str, common: list[str], cal_weight: float | None = None,
              post_steps: int | None = None) -> list[str]:
    """The trainer flags of one arm: ``common`` then the arm's own (the calibrated weight and the post-training
    length filled in; later flags win in argparse, so ``--max_train_steps`` of a post arm overrides)."""
    flags = []
    for f in suite.arms[arm]:
        if f == CAL_WEIGHT:
            if cal_weight is None:
                raise ValueError(f"arm {arm!r}: needs the calibrated weight (cal_weight is None)")
            flags.append(repr(float(cal_weight)))
        elif f == POST_STEPS:
            if post_steps is None:
                raise ValueError(f"arm {arm!r}: needs the post-training length (post_steps is None)")
            flags += ["--max_train_steps", str(post_steps)]
        else:
            flags.append(f)
    return [*common, *flags]


def run_trainer(trainer: Path, run_dir: Path, seed: int, flags: list[str], cache_dir: Path,
                threads: int) -> subprocess.Popen:
    """Start one training run (returns the process; its output goes to ``run_dir/train.log``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(trainer), "--output_dir", str(run_dir), "--seed", str(seed),
           "--cache_dir", str(cache_dir), *flags]
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = open(run_dir / "train.log", "w")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(trainer.parent))
    finally:
        log.close()  # the child holds its own descriptor


def trained_from(run_dir: Path) -> str | None:
    """The tiny pipeline a run fine-tuned, as its train.log names it (None when the log does not say)."""
    marker = "offline demo: tiny SDXL pipeline at "
    for line in (run_dir / "train.log").read_text(errors="replace").splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def read_metrics(csv_path: Path) -> dict[str, np.ndarray]:
    """metrics.csv -> column name -> float array (empty cells are nan)."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cols = rows[0].keys() if rows else []
    return {c: np.array([float(r[c]) if r[c] not in ("", None) else math.nan for r in rows]) for c in cols}


def loss_stats(m: dict[str, np.ndarray], lpl_weight: float) -> dict:
    """Mean diffusion loss, mean LPL loss over the steps where LPL was applied, LPL/diffusion ratios, the
    share of the weighted LPL term in the total loss, and the median time per step (from ``elapsed_s``)."""
    diff = m["diffusion_loss"]
    out = {"diffusion_loss_mean": float(np.nanmean(diff))}
    if "lpl_applied_ratio" in m and np.nanmax(np.nan_to_num(m["lpl_applied_ratio"])) > 0:
        applied = np.nan_to_num(m["lpl_applied_ratio"]) > 0
        lpl = m["lpl_loss"]
        out["lpl_loss_mean_when_applied"] = float(np.nanmean(lpl[applied]))
        out["diffusion_loss_mean_when_applied"] = float(np.nanmean(diff[applied]))
        out["lpl_applied_step_fraction"] = float(applied.mean())
        out["lpl_applied_sample_fraction"] = float(np.nanmean(m["lpl_applied_ratio"]))
        # weighted LPL term / diffusion loss, on the steps that had LPL samples, and over all steps
        out["lpl_to_diffusion_when_applied"] = float(np.nanmean(lpl_weight * lpl[applied] / diff[applied]))
        out["lpl_to_diffusion_overall"] = float(np.nansum(lpl_weight * np.nan_to_num(lpl)) / np.nansum(diff))
        # share of the total loss, w L / (D + w L), of the mean losses on those steps (what the calibration
        # targets) and the mean of the per-step shares
        out["lpl_share_when_applied"] = lpl_share(out["diffusion_loss_mean_when_applied"],
                                                  out["lpl_loss_mean_when_applied"], lpl_weight)
        out["lpl_share_per_step_mean"] = float(np.nanmean(
            lpl_weight * lpl[applied] / (diff[applied] + lpl_weight * lpl[applied])))
    elapsed = m["elapsed_s"]
    if len(elapsed) > 2:
        dt = np.diff(elapsed)  # dt[i]: time of step i + 2 (the first step also holds start-up work)
        out["s_per_step_median"] = float(np.median(dt))
        if "lpl_applied_ratio" in m:
            # Same run, same machine load: steps that decoded LPL samples vs steps that had none.
            applied = np.nan_to_num(m["lpl_applied_ratio"][1:]) > 0
            if applied.any() and (~applied).any():
                out["s_per_step_with_lpl"] = float(np.median(dt[applied]))
                out["s_per_step_without_lpl"] = float(np.median(dt[~applied]))
    return out


def lpl_weight_of(flags: list[str]) -> float:
    """--lpl_weight of a flag list (the last one; 0 when LPL is off or the flag is absent)."""
    if "--no_use_lpl" in flags or "--lpl_weight" not in flags:
        return 0.0
    idx = len(flags) - 1 - flags[::-1].index("--lpl_weight")
    return float(flags[idx + 1])


# ----------------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------------


def load_trainer(trainer: Path):
    """Import ``train_sdxl_lpl.py`` from its path as a module (the tool reuses its data, loss and image code)."""
    import importlib.util

    name = f"train_sdxl_lpl_for_experiment_{abs(hash(str(trainer)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, trainer)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def evaluation_prompts(suite: Suite) -> list[str]:
    """The suite's fixed evaluation captions (``textures.evaluation_prompts`` / ``image_metrics``')."""
    if suite.name == "textures":
        from lpl_ext.demo import textures

        return list(textures.evaluation_prompts())
    from lpl_ext.demo import image_metrics as im

    return im.evaluation_prompts()


def sample_pipeline(tr, model_dir: Path, prompts: list[str], num_images: int, seed: int, resolution: int,
                    out_dir: Path, num_steps: int = 10) -> None:
    """Sample ``num_images`` per prompt (generator seed ``seed + prompt index``) with the pipeline saved in
    ``model_dir``, through the trainer's ``generate_validation_images`` (Euler, guidance 5, as its validation),
    and write them with its ``save_validation_images`` into ``out_dir/eval_samples`` (+ a manifest)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32,
                                                     local_files_only=True)
    sched = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    components = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    images = tr.generate_validation_images(components, pipe.unet.eval(), prompts, num_images, resolution, num_steps,
                                           sched.config.prediction_type, dict(sched.config), seed, "cpu")
    folder = out_dir / EVAL_FOLDER
    paths = tr.save_validation_images(images, folder, 0)
    per_image = [Path(p) for p in paths if "_prompt" in Path(p).name]  # step<k>_prompt<i>_<j>.png, prompt-major
    grid = [Path(p) for p in paths if Path(p) not in per_image]
    if len(per_image) != len(prompts) * num_images or len(grid) != 1:
        raise RuntimeError(f"save_validation_images wrote {[Path(p).name for p in paths]}: expected "
                           f"{len(prompts) * num_images} images and one grid (has the trainer changed?)")
    files = [[str(per_image[r * num_images + c].relative_to(out_dir)) for c in range(num_images)]
             for r in range(len(prompts))]
    manifest = {"images_per_prompt": num_images, "seed": seed, "resolution": resolution, "prompts": prompts,
                "files": files, "grid": str(grid[0].relative_to(out_dir))}
    (out_dir / EVAL_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def load_samples(out_dir: Path) -> tuple[list, list[str], dict]:
    """(images, captions, manifest) of a sampled folder (prompt-major, ``images_per_prompt`` each)."""
    from PIL import Image

    manifest = json.loads((out_dir / EVAL_MANIFEST).read_text())
    images, captions = [], []
    for prompt, files in zip(manifest["prompts"], manifest["files"]):
        for f in files:
            images.append(Image.open(out_dir / f).convert("RGB"))
            captions.append(prompt)
    return images, captions, manifest


def texture_summary(evaluation: dict) -> dict:
    """The numbers of ``texture_metrics.evaluate``'s result (its summary and the band_error_* /
    band_log_ratio_* values) as one flat dict of floats."""
    return {k: float(v) for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mean_spectrum(images: list) -> list[float]:
    """Mean over images of ``texture_metrics.radial_power_spectrum`` (per integer radius bin)."""
    from lpl_ext.demo import texture_metrics as tm

    spectra = [tm.radial_power_spectrum(img) for img in images]
    return np.mean(np.stack(spectra), axis=0).tolist()


def score_samples(suite: Suite, out_dir: Path, reference_seed: int = 0) -> dict:
    """Score the sampled images of ``out_dir`` with the suite's metric; writes and returns ``eval.json``
    (summary, per-prompt summaries; textures also the band errors and the mean radial spectrum)."""
    images, captions, manifest = load_samples(out_dir)
    prompts = manifest["prompts"]
    settings = {k: manifest[k] for k in ("images_per_prompt", "seed", "resolution")}
    if suite.name == "textures":
        from lpl_ext.demo import texture_metrics as tm

        evaluation = tm.evaluate(images, captions, seed=reference_seed)  # references at phases from the seed
        scores = tm.score_images(images, captions)
        per_prompt = {p: tm.summarize([s for s, c in zip(scores, captions) if c == p]) for p in prompts}
        result = {"summary": texture_summary(evaluation), "per_prompt": per_prompt,
                  "spectrum": mean_spectrum(images), **settings}
    else:
        from lpl_ext.demo import image_metrics as im

        scores = im.score_images(images, captions)
        result = {"summary": im.summarize(scores),
                  "per_prompt": {p: im.summarize([s for s in scores if s["caption"] == p]) for p in prompts},
                  **settings}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return result


def _json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def evaluate_pipeline(tr, suite: Suite, model_dir: Path, num_images: int, seed: int, resolution: int,
                      out_dir: Path) -> dict:
    """Sample the suite's evaluation prompts with the pipeline in ``model_dir`` and score them."""
    sample_pipeline(tr, model_dir, evaluation_prompts(suite), num_images, seed, resolution, out_dir)
    return score_samples(suite, out_dir)


def texture_references(base_dir: Path, prompts: list[str], resolution: int, images_per_prompt: int,
                       seed: int) -> dict:
    """The texture metric on real renderings of ``prompts`` (``texture_metrics.reference_renderings`` at phases
    drawn from ``seed``, other than the metric's own references) and on their reconstructions through the
    base's VAE (posterior mean): the floor of the band errors, and the best a model generating through that
    VAE can reach. Also their mean radial spectra."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from lpl_ext.demo import texture_metrics as tm

    renders_of = tm.reference_renderings(prompts, resolution, resolution, images_per_prompt, seed)
    renders = [img.convert("RGB") for p in prompts for img in renders_of[p]]
    captions = [p for p in prompts for _ in renders_of[p]]
    vae = AutoencoderKL.from_pretrained(str(base_dir), subfolder="vae").eval()
    x = torch.from_numpy(np.stack([np.asarray(r) for r in renders])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        rec = torch.cat([vae(chunk, sample_posterior=False).sample for chunk in x.split(16)])
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = {}
    for name, imgs in (("real", renders), ("vae", [Image.fromarray(r) for r in rec])):
        out[name] = {"summary": texture_summary(tm.evaluate(imgs, captions)), "spectrum": mean_spectrum(imgs)}
    return out


# ----------------------------------------------------------------------------------------------------
# Probes at the base (the trainer's own data and loss code)
# ----------------------------------------------------------------------------------------------------


def _probe_setup(tr, model_dir: Path, flags: list[str]):
    """Parsed trainer args, the base's components and the trainer's dataset / collate for ``flags``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    args = tr.parse_args(["--output_dir", str(Path(tempfile.gettempdir()) / "lpl_experiment_probe"), *flags])
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae").eval()
    tok = tuple(CLIPTokenizer.from_pretrained(str(model_dir), subfolder=f) for f in ("tokenizer", "tokenizer_2"))
    te = [CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder"),
          CLIPTextModelWithProjection.from_pretrained(str(model_dir), subfolder="text_encoder_2")]
    sched = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    source = tr.ImageCaptionSource(args)
    dataset = tr.TrainDataset(source, args.resolution, args.center_crop, args.random_flip, seed=args.seed)
    collate = tr.make_collate(tok, args.resolution)
    return args, unet, vae, te, sched, dataset, collate


def _probe_batch(tr, dataset, collate, vae, te, batch_size: int, seed: int, b: int):
    """Batch ``b`` of a probe: the trainer's examples (its crops and crop conditioning), latents, prompts."""
    import torch

    idx = torch.randint(0, len(dataset), (batch_size,), generator=torch.Generator().manual_seed(seed * 1000 + b))
    batch = collate([dataset[i] for i in idx.tolist()])
    latents = tr.encode_latents(vae, batch["pixel_values"], torch.Generator().manual_seed(seed + b))
    embeds, pooled = tr.encode_prompts(te, [batch["input_ids"], batch["input_ids_2"]])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 100 + b))
    return latents, embeds, pooled, batch["add_time_ids"], noise


def _below_threshold_probs(num_timesteps: int, threshold: int):
    import torch

    probs = torch.zeros(num_timesteps)
    probs[:threshold] = 1.0 / threshold
    return probs


def loss_share_probe(tr, model_dir: Path, flags: list[str], *, share: float = 0.2, num_batches: int = 8,
                     batch_size: int = 16, seed: int = 0) -> dict:
    """Measure the losses LPL's share of the total is made of, at the base, and calibrate the weight.

    The trainer's ``compute_losses`` (no gradients) on ``num_batches`` batches of its own ``TrainDataset`` /
    ``make_collate``: once with timesteps drawn uniformly (the diffusion loss of a training step: the mean
    over the whole batch, Min-SNR weighted) and once with every timestep below ``--lpl_t_threshold`` (the LPL
    loss: the mean over the samples it applies to, as on a training step with LPL samples; same batches and
    noise). ``calibrated_weight`` of the mean losses gives the weight whose term is ``share`` of the total.
    Also the mean Min-SNR weight (``lpl_ext.objective.snr_weights``) of uniform and of below-threshold
    timesteps: why the diffusion loss of those samples is small.
    """
    import torch

    from lpl_ext.objective import snr_weights

    args, unet, vae, te, sched, dataset, collate = _probe_setup(tr, model_dir, flags)
    if not args.use_lpl:
        raise ValueError("flags: the share probe needs LPL on (--use_lpl)")
    objective = tr.build_lpl_objective(args, vae)
    alphas_cumprod = sched.alphas_cumprod.float()
    num_t = sched.config.num_train_timesteps
    below = _below_threshold_probs(num_t, args.lpl_t_threshold)
    diffs, lpls, diffs_below = [], [], []
    unet.eval()
    with torch.no_grad():
        for b in range(num_batches):
            latents, embeds, pooled, time_ids, noise = _probe_batch(tr, dataset, collate, vae, te, batch_size, seed, b)
            for probs, sink in ((None, "uniform"), (below, "below")):
                _, metrics = tr.compute_losses(
                    unet=unet, batch_latents=latents, noise=noise, prompt_embeds=embeds, pooled_embeds=pooled,
                    add_time_ids=time_ids, noise_scheduler=sched, prediction_type=sched.config.prediction_type,
                    args=args, lpl_objective=objective, global_step=10 ** 6, alphas_cumprod=alphas_cumprod,
                    generator=torch.Generator().manual_seed(seed + 200 + b), timestep_probs=probs)
                if sink == "uniform":
                    diffs.append(float(metrics["diffusion_loss"]))
                else:
                    lpls.append(float(metrics["lpl_loss"]))
                    diffs_below.append(float(metrics["diffusion_loss"]))
    all_t = torch.arange(num_t)
    snr_w = snr_weights(all_t, args.snr_gamma, prediction_type=sched.config.prediction_type,
                        alphas_cumprod=alphas_cumprod) if args.snr_gamma is not None else torch.ones(num_t)
    d_mean, l_mean = float(np.mean(diffs)), float(np.mean(lpls))
    weight = calibrated_weight(d_mean, l_mean, share)
    return {
        "target_share": share, "calibrated_weight": weight, "t_threshold": args.lpl_t_threshold,
        "diffusion_loss_uniform_t": mean_std(diffs), "lpl_loss_below_threshold": mean_std(lpls),
        "diffusion_loss_below_threshold": mean_std(diffs_below),
        "share_at_weight_1": lpl_share(d_mean, l_mean, 1.0),
        "share_at_calibrated_weight": lpl_share(d_mean, l_mean, weight),
        "min_snr_weight_mean_uniform_t": float(snr_w.mean()),
        "min_snr_weight_mean_below_threshold": float(snr_w[:args.lpl_t_threshold].mean()),
        "batches": num_batches, "batch_size": batch_size, "resolution": args.resolution, "seed": seed,
    }


def gradient_probe(tr, model_dir: Path, flags: list[str], *, num_batches: int = 4, batch_size: int = 32,
                   below_threshold_only: bool = False, seed: int = 0) -> dict:
    """How large is LPL's push on the UNet compared with the diffusion loss's, at the base?

    The trainer's own ``compute_losses`` and ``build_lpl_objective`` on ``num_batches`` batches of its
    ``TrainDataset`` / ``make_collate``: the gradient of the UNet parameters with the arm's ``--lpl_weight``
    minus the gradient with weight 0 (same noise and timesteps) is the weighted LPL gradient. Returns the mean
    over batches of ``|g_lpl| / |g_diff|`` and of their cosine. ``below_threshold_only`` draws every timestep
    below the arm's ``--lpl_t_threshold`` (the samples LPL acts on) instead of uniformly.
    """
    import torch

    args, unet, vae, te, sched, dataset, collate = _probe_setup(tr, model_dir, flags)
    weight = args.lpl_weight
    alphas_cumprod = sched.alphas_cumprod.float()
    objective = tr.build_lpl_objective(args, vae)
    probs = _below_threshold_probs(sched.config.num_train_timesteps, args.lpl_t_threshold) \
        if below_threshold_only else None
    ratios, cosines = [], []
    for b in range(num_batches):
        latents, embeds, pooled, time_ids, noise = _probe_batch(tr, dataset, collate, vae, te, batch_size, seed, b)
        grads = []
        for w in (weight, 0.0):
            args.lpl_weight = w
            unet.zero_grad(set_to_none=True)
            loss, _ = tr.compute_losses(
                unet=unet, batch_latents=latents, noise=noise, prompt_embeds=embeds, pooled_embeds=pooled,
                add_time_ids=time_ids, noise_scheduler=sched, prediction_type=sched.config.prediction_type,
                args=args, lpl_objective=objective, global_step=10 ** 6, alphas_cumprod=alphas_cumprod,
                generator=torch.Generator().manual_seed(seed + 200 + b), timestep_probs=probs)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
        g_lpl, g_diff = grads[0] - grads[1], grads[1]
        ratios.append(float(g_lpl.norm() / g_diff.norm()))
        cosines.append(float(torch.nn.functional.cosine_similarity(g_lpl, g_diff, dim=0)))
    args.lpl_weight = weight
    return {"lpl_weight": weight, "t_threshold": args.lpl_t_threshold, "below_threshold_only": below_threshold_only,
            "grad_norm_ratio": mean_std(ratios), "grad_cosine": mean_std(cosines),
            "batches": num_batches, "batch_size": batch_size}


# ----------------------------------------------------------------------------------------------------
# Aggregation and tables
# ----------------------------------------------------------------------------------------------------


def pixel_differences(out: Path, arms: list[str], seeds: list[int]) -> dict:
    """Mean absolute difference (0..255) between the evaluation grids of each arm and of ``off`` trained with
    the same seed (same sampling seeds), and between ``off`` runs of different training seeds: how much an
    arm changes the pictures, against the run-to-run spread."""
    from PIL import Image

    def grid(arm: str, s: int) -> np.ndarray:
        run_dir = out / "runs" / arm / f"seed{s}"
        manifest = json.loads((run_dir / EVAL_MANIFEST).read_text())
        return np.asarray(Image.open(run_dir / manifest["grid"]).convert("RGB"), np.float32)

    res = {}
    if "off" not in arms:
        return res
    for arm in arms:
        if arm != "off":
            res[arm] = mean_std([float(np.abs(grid(arm, s) - grid("off", s)).mean()) for s in seeds])
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    if pairs:
        res["off_between_seeds"] = mean_std([float(np.abs(grid("off", a) - grid("off", b)).mean()) for a, b in pairs])
    return res


def aggregate(results: dict, arms: list[str], seeds: list[int], metrics: tuple[str, ...]) -> dict:
    """Per arm: mean/std over seeds of every image metric and loss statistic."""
    out = {}
    for arm in arms:
        runs = [results["runs"][arm][str(s)] for s in seeds if str(s) in results["runs"].get(arm, {})]
        agg = {"seeds": [s for s in seeds if str(s) in results["runs"].get(arm, {})]}
        for key in metrics:
            agg[key] = mean_std([r["eval"]["summary"].get(key, math.nan) for r in runs])
        loss_keys = sorted({k for r in runs for k in r["losses"]})
        for key in loss_keys:
            agg[key] = mean_std([r["losses"].get(key, math.nan) for r in runs])
        out[arm] = agg
    return out


def paired_tests(results: dict, suite: Suite, arms: list[str], seeds: list[int]) -> dict:
    """Per arm (except its reference) and metric: paired t-test over the training seeds of the per-seed
    means against the reference arm (``off``, or the suite's pair for the arm)."""
    out = {}
    for arm in arms:
        ref = suite.pairs.get(arm, "off")
        if arm == ref or ref not in arms or arm == "off":
            continue
        common = [s for s in seeds if str(s) in results["runs"].get(arm, {}) and str(s) in results["runs"].get(ref, {})]
        tests = {"against": ref, "seeds": common}
        for key in suite.metrics:
            a = [results["runs"][arm][str(s)]["eval"]["summary"].get(key, math.nan) for s in common]
            b = [results["runs"][ref][str(s)]["eval"]["summary"].get(key, math.nan) for s in common]
            tests[key] = paired_t_test(a, b)
        out[arm] = tests
    return out


def fmt(ms: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not ms or ms["n"] == 0:
        return "-"
    if pct:
        return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"
    return f"{ms['mean']:.{digits}g} ± {ms['std']:.{digits}g}" if ms["std"] else f"{ms['mean']:.{digits}g}"


def _fmt_value(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def markdown_tables(results: dict) -> str:
    """The shapes suite's result tables in Markdown (percentages for accuracies)."""
    labels = SHAPES.labels
    agg, base = results["arms"], results["base"]["summary"]
    lines = [
        "| arm | seeds | all right % | fg colour % | bg colour % | shape % | size % | shape IoU | edge width px "
        "| fg colour error |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {labels['base']} | - | {100 * base['all_acc']:.1f} | {100 * base['fg_acc']:.1f} | "
        f"{100 * base['bg_acc']:.1f} | {100 * base['shape_acc']:.1f} | {100 * base['size_acc']:.1f} | "
        f"{base['shape_iou']:.3f} | {base['edge_width_px']:.2f} | {base['fg_error']:.1f} |",
    ]
    for arm, a in agg.items():
        lines.append(
            f"| {labels.get(arm, arm)} | {','.join(map(str, a['seeds']))} | {fmt(a['all_acc'], pct=True)} | "
            f"{fmt(a['fg_acc'], pct=True)} | {fmt(a['bg_acc'], pct=True)} | {fmt(a['shape_acc'], pct=True)} | "
            f"{fmt(a['size_acc'], pct=True)} | {fmt(a['shape_iou'])} | {fmt(a['edge_width_px'])} | "
            f"{fmt(a['fg_error'])} |")
    ref = results.get("dataset_reference", {})
    if ref:
        for name, label in (("raw", "dataset drawings"), ("vae", "dataset through the VAE")):
            r = ref[name]
            lines.append(f"| {label} | - | {100 * r['all_acc']:.1f} | {100 * r['fg_acc']:.1f} | "
                         f"{100 * r['bg_acc']:.1f} | {100 * r['shape_acc']:.1f} | {100 * r['size_acc']:.1f} | "
                         f"{r['shape_iou']:.3f} | {r['edge_width_px']:.2f} | {r['fg_error']:.1f} |")
    lines += loss_table(agg, labels)
    lines += pixel_difference_table(results, agg, labels)
    lines += gradient_probe_table(results, labels)
    return "\n".join(lines) + "\n"


def pixel_difference_table(results: dict, agg: dict, labels: dict) -> list[str]:
    """Markdown lines: each arm's mean absolute pixel difference to LPL off (same training seed), and LPL off
    between training seeds for scale; none when the results have no such numbers."""
    pix = results.get("pixel_difference_to_off", {})
    if not pix:
        return []
    lines = ["", "| arm | mean abs. pixel difference (0-255) of its samples to LPL off, same training seed |",
             "|---|---|"]
    lines += [f"| {labels.get(arm, arm)} | {fmt(pix[arm])} |" for arm in agg if arm in pix]
    if "off_between_seeds" in pix:
        lines.append(f"| (LPL off, between training seeds) | {fmt(pix['off_between_seeds'])} |")
    return lines


def gradient_probe_table(results: dict, labels: dict) -> list[str]:
    """The gradient probe's rows (weighted LPL gradient / diffusion gradient and their cosine at the base)."""
    probes = results.get("gradient_probe", {})
    if not probes:
        return []
    lines = ["", "| arm | weighted LPL grad / diffusion grad (t uniform) | cosine | "
             "same, every t below the threshold | cosine |", "|---|---|---|---|---|"]
    for arm in results["arms"]:
        u, b = probes.get(f"{arm}/uniform_t"), probes.get(f"{arm}/below_threshold")
        if u and b:
            lines.append(f"| {labels.get(arm, arm)} | {fmt(u['grad_norm_ratio'])} | {fmt(u['grad_cosine'])} | "
                         f"{fmt(b['grad_norm_ratio'])} | {fmt(b['grad_cosine'])} |")
    return lines


def loss_table(agg: dict, labels: dict) -> list[str]:
    """Losses, LPL's share and time per step, from each run's metrics.csv (mean ± std over seeds)."""
    lines = ["", "| arm | diffusion loss | LPL loss (steps with LPL) | weighted LPL / diffusion (those steps) "
             "| weighted LPL share of the total loss (those steps) | weighted LPL / diffusion (all steps) "
             "| steps with LPL % | s / step (median) | s / step, steps with / without LPL samples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in agg.items():
        lines.append(
            f"| {labels.get(arm, arm)} | {fmt(a.get('diffusion_loss_mean'))} | "
            f"{fmt(a.get('lpl_loss_mean_when_applied'))} | {fmt(a.get('lpl_to_diffusion_when_applied'))} | "
            f"{fmt(a.get('lpl_share_when_applied'), pct=True)} | "
            f"{fmt(a.get('lpl_to_diffusion_overall'))} | {fmt(a.get('lpl_applied_step_fraction'), pct=True)} | "
            f"{fmt(a.get('s_per_step_median'))} | "
            f"{fmt(a.get('s_per_step_with_lpl'))} / {fmt(a.get('s_per_step_without_lpl'))} |")
    return lines


def texture_tables(results: dict) -> str:
    """The texture suite's tables in Markdown: metrics per arm, paired tests against LPL off, losses and the
    share of LPL, the calibration probe."""
    labels, metrics = TEXTURES.labels, TEXTURES.metrics
    agg = results["arms"]
    ref = results.get("texture_reference", {})
    lines: list[str] = []

    def row(label: str, seeds: str, summary: dict, keys: tuple[str, ...]) -> str:
        return f"| {label} | {seeds} | " + " | ".join(_fmt_value(summary.get(k)) for k in keys) + " |"

    for group in TEXTURE_TABLE_GROUPS:
        if lines:
            lines.append("")
        lines += ["| arm | seeds | " + " | ".join(METRIC_LABELS.get(k, k) for k in group) + " |",
                  "|" + "---|" * (len(group) + 2)]
        lines.append(row(labels["base"], "-", results["base"]["summary"], group))
        for arm, a in agg.items():
            lines.append(f"| {labels.get(arm, arm)} | {','.join(map(str, a['seeds']))} | "
                         + " | ".join(fmt(a[k]) for k in group) + " |")
        for name, label in (("real", "real renderings (other phases)"),
                            ("vae", "real renderings through the VAE")):
            if name in ref:
                lines.append(row(label, "-", ref[name]["summary"], group))
    tests = results.get("paired_tests", {})
    if tests:
        lines += ["", "Paired t-test over training seeds (per-seed means; difference = arm - reference, "
                  "mean ± std over seeds, two-sided p):", "",
                  "| arm | against | metric | difference | p | verdict |", "|---|---|---|---|---|---|"]
        for arm, t in tests.items():
            for key in metrics:
                r = t[key]
                diff = "-" if r["n"] == 0 else (f"{r['mean_diff']:.3g} ± {r['std_diff']:.3g}"
                                                if r["n"] > 1 else f"{r['mean_diff']:.3g}")
                if r["p"] is None:
                    verdict = "needs >= 2 seeds"
                elif r["distinguishable"]:
                    verdict = "larger than seed noise (p < 0.05)"
                else:
                    verdict = "not distinguishable from seed noise"
                lines.append(f"| {labels.get(arm, arm)} | {labels.get(t['against'], t['against'])} | "
                             f"{METRIC_LABELS.get(key, key)} | {diff} | {_fmt_value(r['p'])} | {verdict} |")
    lines += loss_table(agg, labels)
    cal = results.get("calibration")
    if cal:
        lines += ["", "Calibration probe at the base (trainer's compute_losses, "
                  f"{cal['batches']} batches of {cal['batch_size']}):", "",
                  "| diffusion loss, t uniform | LPL loss, t < threshold | LPL share at w=1 | target share "
                  "| calibrated weight | mean Min-SNR weight, t uniform / t < threshold |",
                  "|---|---|---|---|---|---|",
                  f"| {fmt(cal['diffusion_loss_uniform_t'])} | {fmt(cal['lpl_loss_below_threshold'])} | "
                  f"{100 * cal['share_at_weight_1']:.2f}% | {100 * cal['target_share']:.0f}% | "
                  f"{cal['calibrated_weight']:.4g} | {cal['min_snr_weight_mean_uniform_t']:.3g} / "
                  f"{cal['min_snr_weight_mean_below_threshold']:.3g} |"]
    lines += pixel_difference_table(results, agg, labels)
    lines += gradient_probe_table(results, labels)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


def _save_quantized(fig, path: Path) -> None:
    """Save a figure as a 256-colour PNG (the panels hold few colours; keeps committed figures small)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110)
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _grid_tiles(folder: Path, cols: int):
    """(grid image cropped to the first ``cols`` images per prompt, tile height) of a sampled folder."""
    from PIL import Image

    manifest = json.loads((folder / EVAL_MANIFEST).read_text())
    grid = Image.open(folder / manifest["grid"])
    tile = grid.height // len(manifest["prompts"])
    return np.asarray(grid.convert("RGB").crop((0, 0, cols * tile, grid.height))), tile, manifest["prompts"]


def plot_samples(out: Path, arms: list[str], seed: int, rows: int, cols: int, path: Path,
                 suite: Suite = SHAPES, real_panel: np.ndarray | None = None) -> None:
    """Side-by-side sample grids (first ``rows`` prompts, ``cols`` images each) of the base and each arm (and
    ``real_panel``, real renderings of the same prompts, first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("base", out / "base")] + [(arm, out / "runs" / arm / f"seed{seed}") for arm in arms]
    loaded = [(name, *_grid_tiles(folder, cols)) for name, folder in panels]
    if real_panel is not None:
        loaded.insert(0, ("real renderings", real_panel, loaded[0][2], loaded[0][3]))
    fig, axes = plt.subplots(1, len(loaded), figsize=(0.75 * cols * len(loaded) + 2.8, 0.75 * rows + 0.9))
    for i, (ax, (name, grid, tile, prompts)) in enumerate(zip(np.atleast_1d(axes), loaded)):
        ax.imshow(grid[:rows * tile], interpolation="nearest")
        ax.set_title(textwrap.fill(suite.labels.get(name, name), 18), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([(r + 0.5) * tile for r in range(rows)] if i == 0 else [])
        if i == 0:
            short = [p.replace("a ", "", 1).replace(" on a ", " on ").replace(" background", "")
                     for p in prompts[:rows]] if suite.name == "shapes" else prompts[:rows]
            ax.set_yticklabels(short, fontsize=7)
    fig.suptitle(f"samples after fine-tuning\n(training seed {seed}; same sampling seeds in every panel)",
                 fontsize=9)
    fig.tight_layout()
    _save_quantized(fig, path)


def real_renderings_panel(prompts: list[str], cols: int, resolution: int) -> np.ndarray:
    """Real renderings of ``prompts`` (phases 0, 1, ... px), one row per prompt, as a grid array."""
    from lpl_ext.demo import textures

    rows = [np.concatenate([np.asarray(textures.render(p, resolution, resolution, phase=(c, c)).convert("RGB"))
                            for c in range(cols)], axis=1) for p in prompts]
    return np.concatenate(rows, axis=0)


def plot_curves(out: Path, results: dict, arms: list[str], seeds: list[int], path: Path) -> None:
    """Loss curves (mean over seeds, smoothed) and the main metrics per arm (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = SHAPES.labels

    def smooth(v: np.ndarray, beta: float = 0.95) -> np.ndarray:
        out_v, acc, n = np.empty_like(v), 0.0, 0.0
        for i, x in enumerate(v):
            if math.isfinite(x):
                acc, n = beta * acc + (1 - beta) * x, beta * n + (1 - beta)
            out_v[i] = acc / n if n else math.nan
        return out_v

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for a_idx, arm in enumerate(arms):
        diffs, lpls = [], []
        for s in seeds:
            m = read_metrics(out / "runs" / arm / f"seed{s}" / "metrics.csv")
            diffs.append(smooth(m["diffusion_loss"]))
            if "lpl_loss" in m and np.nanmax(np.nan_to_num(m["lpl_loss"])) > 0:
                applied = np.nan_to_num(m["lpl_applied_ratio"]) > 0
                lpls.append(smooth(np.where(applied, m["lpl_loss"], math.nan)))
        steps = np.arange(1, len(diffs[0]) + 1)
        axes[0].plot(steps, np.nanmean(diffs, 0), color=colors[a_idx], label=labels.get(arm, arm))
        if lpls:
            axes[1].plot(steps, np.nanmean(lpls, 0), color=colors[a_idx], label=labels.get(arm, arm))
    axes[0].set(title="diffusion loss (EMA 0.95, mean of seeds)", xlabel="step")
    axes[0].text(0.02, 0.02, "arms with w <= 2 lie under one another", transform=axes[0].transAxes, fontsize=7)
    axes[1].set(title="LPL loss on steps with LPL samples (unweighted)", xlabel="step")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    names = ["base"] + arms
    for ax, key, title in ((axes[2], "all_acc", "images fully right (colour, bg, shape)"),
                           (axes[3], "edge_width_px", "edge width, px (lower = sharper)")):
        means = [results["base"]["summary"][key]] + [results["arms"][a][key]["mean"] for a in arms]
        stds = [0.0] + [results["arms"][a][key]["std"] for a in arms]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4,
               color=["0.6"] + [colors[i] for i in range(len(arms))])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([labels.get(n, n) for n in names], rotation=25, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if key == "edge_width_px" and "dataset_reference" in results:
            ax.axhline(results["dataset_reference"]["vae"]["edge_width_px"], color="k", ls="--", lw=1,
                       label="dataset through the VAE")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(results: dict, arms: list[str], seeds: list[int], resolution: int, path: Path) -> None:
    """Left: radially averaged power spectrum (mean over images, then over seeds) per arm and of the real
    renderings, with the texture metric's band edges; right: band errors per arm (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpl_ext.demo import texture_metrics as tm

    labels = TEXTURES.labels
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(13, 4.2))
    ref = results.get("texture_reference", {})

    def curve(spectrum: list[float], **kw) -> None:
        spec = np.asarray(spectrum, dtype=np.float64)
        freq = np.arange(len(spec)) / resolution  # radius bin r of an N x N image: r / N cycles per pixel
        keep = (freq > 0) & (spec > 0)
        ax_s.plot(freq[keep], spec[keep], **kw)

    if "real" in ref:
        curve(ref["real"]["spectrum"], color="k", lw=2, label="real renderings")
    if "vae" in ref:
        curve(ref["vae"]["spectrum"], color="k", lw=1, ls="--", label="real through the VAE")
    curve(results["base"]["spectrum"], color="0.6", lw=1, label=labels["base"])
    for i, arm in enumerate(arms):
        spectra = [results["runs"][arm][str(s)]["eval"]["spectrum"] for s in seeds
                   if str(s) in results["runs"].get(arm, {})]
        if spectra:
            curve(np.mean(np.stack([np.asarray(s) for s in spectra]), axis=0).tolist(), color=colors[i],
                  label=labels.get(arm, arm))
    for name, (lo, hi) in tm.BANDS.items():
        for edge in (lo, hi):
            ax_s.axvline(edge, color="0.5", lw=0.6, ls=":")
        ax_s.text((lo + hi) / 2, 0.98, f"{name} band", transform=ax_s.get_xaxis_transform(), ha="center",
                  va="top", fontsize=8)
    ax_s.set(yscale="log", xlim=(0, 0.5), xlabel="frequency (cycles / pixel; band edges dotted)", ylabel="power",
             title="radially averaged power spectrum (mean over images and seeds)")
    ax_s.legend(fontsize=7, loc="lower left")
    ax_s.grid(alpha=0.3, which="both")
    bands = list(tm.BANDS)
    names = ["base", *arms]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        if name == "base":
            means = [results["base"]["summary"][f"band_error_{b}"] for b in bands]
            stds = [0.0] * len(bands)
        else:
            means = [results["arms"][name][f"band_error_{b}"]["mean"] for b in bands]
            stds = [results["arms"][name][f"band_error_{b}"]["std"] for b in bands]
        ax_b.bar(np.arange(len(bands)) + (j - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                 color="0.6" if name == "base" else colors[j - 1], label=labels.get(name, name))
    if "vae" in ref:
        for k, b in enumerate(bands):
            ax_b.hlines(ref["vae"]["summary"][f"band_error_{b}"], k - 0.4, k + 0.4, color="k", ls="--", lw=1,
                        label="real through the VAE" if k == 0 else None)
    ax_b.set_xticks(range(len(bands)))
    ax_b.set_xticklabels(bands)
    ax_b.set(ylabel="mean |log10 power ratio| vs real", title="band spectrum error (mean ± std over seeds)")
    ax_b.legend(fontsize=7)
    ax_b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def estimate_seconds(suite: Suite, pending: list[tuple[str, int, int]], jobs: int) -> float:
    """Wall-time estimate of the pending runs ``(arm, seed, steps)``: steps x the suite's measured s/step (LPL
    on or off) plus sampling and scoring, ``jobs`` at a time."""
    total = 0.0
    for arm, _, steps in pending:
        on = "--use_lpl" in suite.arms[arm]
        total += steps * suite.est_s_per_step[1 if on else 0] + suite.est_eval_s
    return total / max(1, min(jobs, len(pending) or 1))


def base_pretraining(suite: Suite) -> dict | None:
    """Steps and batch size the suite's shipped base was pretrained with (its asset record's settings), or
    None without a record."""
    from lpl_ext.demo import tiny_sdxl as ts

    record = ts.tiny_base_weights_path(suite.synthetic_data or "shapes").with_suffix(".json")
    if not record.is_file():
        return None
    settings = json.loads(record.read_text())["settings"]
    return {"record": record.name, "steps": int(settings["steps"]), "batch_size": int(settings["batch_size"])}


def post_training_steps(pretraining: dict, fraction: float, batch_size: int) -> int:
    """Fine-tuning steps of batch ``batch_size`` that see ``fraction`` of the pretraining's samples."""
    return max(1, round(fraction * pretraining["steps"] * pretraining["batch_size"] / batch_size))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=list(SUITES), default="shapes",
                   help="shapes: the flat-colour shapes experiment (docs/experiment.md); textures: fine textures, "
                        "spectral metrics, a calibrated LPL arm and paired tests over seeds.")
    p.add_argument("--out", type=str, required=True, help="Experiment folder (outside the repository).")
    p.add_argument("--trainer", type=str, default=str(ROOT / "train_sdxl_lpl.py"))
    all_arms = sorted({a for s in SUITES.values() for a in s.arms})
    p.add_argument("--arms", nargs="+", default=None, choices=all_arms,
                   help="Arms (default: the suite's). shapes: " + "; ".join(
                       f"{k}: {' '.join(v)}" for k, v in SHAPES.arms.items()) + ". textures: " + "; ".join(
                       f"{k}: {' '.join(v)}" for k, v in TEXTURES.arms.items())
                   + f" ({CAL_WEIGHT}: the calibrated weight, {POST_STEPS}: --post_fraction of the base's "
                     "pretraining steps; lpl_post and off_post are opt-in).")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="Training seeds (default: the suite's, 0 1 2).")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Training steps per run (default: shapes {SHAPES.steps}, textures {TEXTURES.steps}).")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_examples", type=int, default=None,
                   help="--num_synthetic_examples of the trainer (default: shapes 256, every combination; textures "
                        "textures.num_distinct_examples(), every pattern, orientation, period and colour pair).")
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--trainer_args", type=str, default="", help="Extra trainer flags for every arm (one string).")
    p.add_argument("--eval_images", type=int, default=4, help="Images per evaluation prompt.")
    p.add_argument("--eval_prompts", type=int, default=None,
                   help="Use only the first N evaluation prompts (smoke runs; default: all).")
    p.add_argument("--eval_seed", type=int, default=1000)
    p.add_argument("--cal_share", type=float, default=0.2,
                   help="textures: share of the weighted LPL term in the total loss that lpl_cal's weight targets.")
    p.add_argument("--cal_batches", type=int, default=8, help="textures: batches of the calibration probe.")
    p.add_argument("--probe_batches", type=int, default=4,
                   help="Batches (of 32) of the gradient probe at the base, per LPL arm and timestep draw.")
    p.add_argument("--post_fraction", type=float, default=1 / 3,
                   help="Post-training arms: this fraction of the base's pretraining samples (steps x batch; "
                        "paper: 1/5-1/3 of the pretraining iterations).")
    p.add_argument("--jobs", type=int, default=None, help="Training runs in parallel (default: shapes 1, textures 2).")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per training run.")
    p.add_argument("--figures", type=str, default=None, help="Folder for the figures (default: --out).")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    suite = SUITES[args.suite]
    args.arms = args.arms or list(suite.default_arms)
    args.seeds = args.seeds if args.seeds is not None else list(suite.seeds)
    args.steps = args.steps if args.steps is not None else suite.steps
    args.jobs = args.jobs if args.jobs is not None else suite.jobs
    unknown = [a for a in args.arms if a not in suite.arms]
    if unknown:
        p.error(f"--arms: {unknown} are not arms of --suite {suite.name} (its arms: {', '.join(suite.arms)})")
    for name in ("steps", "batch_size", "num_examples", "eval_images", "jobs", "threads", "cal_batches",
                 "probe_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.eval_prompts is not None and args.eval_prompts < 1:
        p.error(f"--eval_prompts must be >= 1, got {args.eval_prompts}")
    if not 0.0 < args.cal_share < 1.0:
        p.error(f"--cal_share must be in (0, 1), got {args.cal_share}")
    if not 0.0 < args.post_fraction <= 1.0:
        p.error(f"--post_fraction must be in (0, 1], got {args.post_fraction}")
    trainer = Path(args.trainer).resolve()
    if not trainer.is_file():
        p.error(f"--trainer {trainer} does not exist")
    if args.num_examples is None:
        args.num_examples = suite.num_examples
        if args.num_examples == 0:
            from lpl_ext.demo import textures

            args.num_examples = textures.num_distinct_examples()
    args.post_steps = None
    pretraining = base_pretraining(suite)
    if any(POST_STEPS in suite.arms[a] for a in args.arms):
        if pretraining is None:
            p.error("the post-training arms need the base's asset record (its pretraining steps and batch size)")
        args.post_steps = post_training_steps(pretraining, args.post_fraction, args.batch_size)

    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(args.threads * args.jobs)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from lpl_ext.demo import tiny_sdxl as ts

    tr = load_trainer(trainer)
    out = Path(args.out).resolve()
    cache = out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    common = common_flags(args, suite)
    # The resolution and the base pipeline exactly as the trainer resolves them for these flags.
    resolution = tr.parse_args(["--output_dir", str(out / "_parse"), *common]).resolution
    base_dir = ts.ensure_tiny_sdxl(cache, dataset=suite.synthetic_data) if suite.synthetic_data else \
        ts.ensure_tiny_sdxl(cache)
    prompts = evaluation_prompts(suite)[:args.eval_prompts]
    # Everything cached in --out (base samples, probes, runs) belongs to one base pipeline: the texture
    # pipeline's cache folder is named by a hash of its shipped assets, so a new VAE or base is a new folder.
    base_record = out / "base_pipeline.txt"
    if base_record.is_file() and base_record.read_text().strip() != base_dir.name:
        raise SystemExit(f"{out} holds results of the base pipeline {base_record.read_text().strip()}, not of "
                         f"{base_dir.name} (the shipped assets changed?): use another --out")
    base_record.write_text(base_dir.name + "\n")

    def evaluate(model_dir: Path, folder: Path) -> dict:
        sample_pipeline(tr, model_dir, prompts, args.eval_images, args.eval_seed, resolution, folder)
        return score_samples(suite, folder)

    def planned(arm: str) -> int:
        return args.post_steps if POST_STEPS in suite.arms[arm] else args.steps

    all_runs = [(arm, s) for s in args.seeds for arm in args.arms]  # seed-major: with --jobs > 1 the arms
    pending = [(arm, s) for arm, s in all_runs  # share the machine alike, so their step times compare
               if not (out / "runs" / arm / f"seed{s}" / DONE_MARKER).is_file()]
    estimate = estimate_seconds(suite, [(a, s, planned(a)) for a, s in pending], args.jobs)
    print(f"suite {suite.name}: {len(all_runs)} runs ({len(all_runs) - len(pending)} already done), "
          f"arms {' '.join(args.arms)}, seeds {' '.join(map(str, args.seeds))}, {args.steps} steps"
          + (f" (post-training arms {args.post_steps})" if args.post_steps else "")
          + f", {args.jobs} at a time; estimated {(estimate + FIXED_OVERHEAD_S) / 60:.0f} min "
          f"({estimate / 60:.0f} min of runs at {suite.est_s_per_step[0]:g} / {suite.est_s_per_step[1]:g} s per step "
          f"with LPL off / on, measured on 2 shared cores)", flush=True)

    if not (out / "base" / EVAL_MANIFEST).is_file():
        evaluate(base_dir, out / "base")
    calibration = None
    if any(CAL_WEIGHT in suite.arms[a] for a in args.arms):
        cal_path = out / "calibration.json"
        if cal_path.is_file():
            calibration = json.loads(cal_path.read_text())
        else:
            print("calibration probe at the base ...", flush=True)
            calibration = loss_share_probe(tr, base_dir, [*common, *LPL_REC], share=args.cal_share,
                                           num_batches=args.cal_batches, seed=0)
            cal_path.write_text(json.dumps(calibration, indent=1) + "\n")
        if abs(calibration["target_share"] - args.cal_share) > 1e-12:
            raise SystemExit(f"{cal_path} was calibrated for share {calibration['target_share']}, not --cal_share "
                             f"{args.cal_share}: use another --out or delete it (and the lpl_cal runs)")
        print(f"calibrated --lpl_weight {calibration['calibrated_weight']:.4g} (LPL share at w=1: "
              f"{100 * calibration['share_at_weight_1']:.2f}%, target {100 * args.cal_share:.0f}%)", flush=True)
    cal_weight = calibration["calibrated_weight"] if calibration else None

    def flags_of(arm: str) -> list[str]:
        return arm_flags(suite, arm, common, cal_weight, args.post_steps)

    for arm, s in all_runs:  # a finished run is reused only if it was trained with the flags it would get now
        marker = out / "runs" / arm / f"seed{s}" / DONE_MARKER
        recorded = json.loads(marker.read_text()).get("flags") if marker.is_file() else None
        if recorded is not None and recorded != flags_of(arm):
            raise SystemExit(f"{marker.parent} was trained with other flags ({shlex.join(recorded)}) than this "
                             f"command gives it ({shlex.join(flags_of(arm))}): use another --out, or delete that run")

    torch.set_num_threads(args.threads)  # the training runs share the cores with the evaluations below
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failures = []
    progress = tqdm(total=len(all_runs), initial=len(all_runs) - len(pending), desc="runs", unit="run",
                    dynamic_ncols=True)

    def start_runs() -> None:
        while pending and len(running) < args.jobs:
            arm, s = pending.pop(0)
            run_dir = out / "runs" / arm / f"seed{s}"
            running.append((arm, s, run_trainer(trainer, run_dir, s, flags_of(arm), cache, args.threads),
                            time.time()))
            tqdm.write(f"[{time.time() - t_start:6.0f}s] started {arm} seed {s} (log: {run_dir / 'train.log'})")

    while pending or running:
        start_runs()
        time.sleep(2)
        finished = [item for item in running if item[2].poll() is not None]
        for item in finished:
            running.remove(item)
        start_runs()  # keep the cores busy while the finished ones are sampled and scored
        for arm, s, proc, t0 in finished:
            run_dir = out / "runs" / arm / f"seed{s}"
            wall = time.time() - t0
            used = trained_from(run_dir)
            problem = None
            if proc.returncode != 0:
                problem = f"exit {proc.returncode} (see {run_dir / 'train.log'})"
            elif used is not None and Path(used) != base_dir:
                # the shipped assets changed while the experiment ran: the runs would not share one base
                problem = f"trained from {used}, not from the experiment's base {base_dir} (use a new --out)"
            if problem:
                failures.append(f"{arm} seed {s}: {problem}")
                tqdm.write(f"FAILED {failures[-1]}")
                progress.update(1)
                continue
            evaluation = evaluate(run_dir, run_dir)
            flags = flags_of(arm)
            record = {"arm": arm, "seed": s, "wall_s": round(wall, 1), "flags": flags, "trained_from": used,
                      "losses": loss_stats(read_metrics(run_dir / "metrics.csv"), lpl_weight_of(flags)),
                      "eval": {"summary": evaluation["summary"]}}
            (run_dir / DONE_MARKER).write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
            progress.update(1)
            summary = evaluation["summary"]
            shown = " ".join(f"{k} {summary[k]:.3g}" for k in suite.metrics[:4] if k in summary)
            tqdm.write(f"[{time.time() - t_start:6.0f}s] done {arm} seed {s} in {wall:.0f}s: {shown}")
    progress.close()
    if failures:
        raise SystemExit("runs failed:\n" + "\n".join(failures))
    torch.set_num_threads(args.threads * args.jobs)

    results = {
        "suite": suite.name,
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "settings": {k: v for k, v in vars(args).items()},
        "resolution": resolution,
        "base_pipeline": str(base_dir),
        # the fine-tuning's samples (steps x batch) as a fraction of the base's pretraining samples
        "pretraining": pretraining and {**pretraining, "fine_tuning_fraction_of_samples": round(
            args.steps * args.batch_size / (pretraining["steps"] * pretraining["batch_size"]), 4)},
        "common_trainer_flags": common,
        "arm_flags": {a: flags_of(a)[len(common):] for a in args.arms},
        "base": score_samples(suite, out / "base"),
        "runs": {arm: {str(s): json.loads((out / "runs" / arm / f"seed{s}" / DONE_MARKER).read_text())
                       for s in args.seeds} for arm in args.arms},
    }
    if calibration:
        results["calibration"] = calibration
    for arm in args.arms:  # scores and loss statistics from the saved samples and metrics files, so a change of
        for s in args.seeds:  # the metric or of loss_stats applies to finished runs too
            run_dir = out / "runs" / arm / f"seed{s}"
            run = results["runs"][arm][str(s)]
            # runs finished by an older version of this tool have no sample manifest: sample them again
            evaluation = score_samples(suite, run_dir) if (run_dir / EVAL_MANIFEST).is_file() else \
                evaluate(run_dir, run_dir)
            run["eval"] = {"summary": evaluation["summary"]}
            if "spectrum" in evaluation:
                run["eval"]["spectrum"] = evaluation["spectrum"]
            run["losses"] = loss_stats(read_metrics(run_dir / "metrics.csv"), lpl_weight_of(flags_of(arm)))
    results["arms"] = aggregate(results, args.arms, args.seeds, suite.metrics)
    results["pixel_difference_to_off"] = pixel_differences(out, args.arms, args.seeds)
    figures = Path(args.figures) if args.figures else out
    figures.mkdir(parents=True, exist_ok=True)
    probe_path = out / "gradient_probe.json"
    probes = json.loads(probe_path.read_text()) if probe_path.is_file() else {}
    for arm in args.arms:
        if "--use_lpl" not in suite.arms[arm] or POST_STEPS in suite.arms[arm]:  # post arms: lpl_cal's flags
            continue
        for below in (False, True):
            key = f"{arm}/{'below_threshold' if below else 'uniform_t'}"
            if probes.get(key, {}).get("lpl_weight") != lpl_weight_of(flags_of(arm)):
                probes[key] = gradient_probe(tr, base_dir, flags_of(arm), below_threshold_only=below,
                                             num_batches=args.probe_batches)
                probe_path.write_text(json.dumps(probes, indent=1) + "\n")
    results["gradient_probe"] = probes
    if suite.name == "shapes":
        from lpl_ext.demo import image_metrics as im

        results["dataset_reference"] = im.dataset_reference(64, vae=ts.build_tiny_vae().eval())
        tables = markdown_tables(results)
        written = [figures / "experiment_samples.png", figures / "experiment_curves.png"]
        plot_samples(out, args.arms, args.seeds[0], rows=len(prompts), cols=min(2, args.eval_images), path=written[0])
        plot_curves(out, results, args.arms, args.seeds, written[1])
    else:
        results["paired_tests"] = paired_tests(results, suite, args.arms, args.seeds)
        results["texture_reference"] = texture_references(base_dir, prompts, resolution, args.eval_images, seed=12345)
        tables = texture_tables(results)
        written = [figures / "textures_samples.png", figures / "textures_spectra.png"]
        cols = min(2, args.eval_images)
        plot_samples(out, args.arms, args.seeds[0], rows=len(prompts), cols=cols, path=written[0], suite=suite,
                     real_panel=real_renderings_panel(prompts, cols, resolution))
        plot_spectra(results, args.arms, args.seeds, resolution, written[1])
    results["wall_s"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    (out / "results.md").write_text(tables)
    print(tables)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(map(str, written))} "
          f"({results['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
