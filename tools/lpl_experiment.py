"""LPL on/off experiment in miniature: fine-tune the tiny SDXL base with and without LPL, score the samples.

Every run is ``train_sdxl_lpl.py`` itself (a subprocess with flags; nothing of the trainer is copied): the
same pretrained tiny base (``lpl_ext/demo/assets/tiny_sdxl_base.safetensors``), the same built-in data, the same
number of steps, learning rate and seeds; the arms differ only in their LPL flags. After training, each
run's saved pipeline samples the fixed prompts of ``lpl_ext.demo.image_metrics.evaluation_prompts`` with the
same generator seeds, and ``lpl_ext.demo.image_metrics`` scores the images (foreground/background colour, shape,
size, shape IoU, edge width). The base itself is scored the same way (step 0).

Outputs under ``--out``: ``runs/<arm>/seed<k>/`` (the trainer's output_dir, plus ``eval.json`` and
``eval_grid.png``), ``base/``, ``results.json`` (per run and per arm: metric mean, std and the seed list;
LPL/diffusion loss ratio; time per step), ``results.md`` (the tables), and the figures
``experiment_samples.png`` (sample grids side by side) and ``experiment_curves.png`` (loss curves and
metrics). Runs already finished in ``--out`` are reused, so an interrupted experiment resumes.

    python tools/lpl_experiment.py --out /tmp/lpl_experiment                  # the documented experiment
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Arm name -> the trainer's LPL flags. Everything else is shared (see common_flags).
ARMS: dict[str, list[str]] = {
    "off": ["--no_use_lpl"],
    "lpl_w1": ["--use_lpl", "--lpl_weight", "1.0", "--lpl_t_threshold", "200"],
    "lpl_w2": ["--use_lpl", "--lpl_weight", "2.0", "--lpl_t_threshold", "200"],
    "lpl_w100": ["--use_lpl", "--lpl_weight", "100.0", "--lpl_t_threshold", "200"],
    "lpl_w1_t500": ["--use_lpl", "--lpl_weight", "1.0", "--lpl_t_threshold", "500"],
}
ARM_LABELS = {
    "base": "base (step 0)",
    "off": "LPL off",
    "lpl_w1": "LPL w=1, t<200",
    "lpl_w2": "LPL w=2, t<200",
    "lpl_w100": "LPL w=100, t<200",
    "lpl_w1_t500": "LPL w=1, t<500",
}
METRICS = ("all_acc", "fg_acc", "bg_acc", "shape_acc", "size_acc", "shape_iou", "edge_width_px", "fg_error",
           "bg_error")
DONE_MARKER = "experiment_run_done.json"


def common_flags(args: argparse.Namespace) -> list[str]:
    """Trainer flags shared by every arm."""
    return [
        "--max_train_steps", str(args.steps),
        "--learning_rate", repr(args.lr),
        "--lr_scheduler", "constant",
        "--train_batch_size", str(args.batch_size),
        "--num_synthetic_examples", str(args.num_examples),
        "--snr_gamma", repr(args.snr_gamma),
        "--num_validation_images", "0",
        "--checkpointing_steps", str(10 * args.steps),  # no intermediate checkpoints: they only cost time
        *shlex.split(args.trainer_args),
    ]


def run_trainer(trainer: Path, run_dir: Path, seed: int, flags: list[str], cache_dir: Path,
                threads: int) -> subprocess.Popen:
    """Start one training run (returns the process; its log goes to ``run_dir/train.log``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(trainer), "--output_dir", str(run_dir), "--seed", str(seed),
           "--cache_dir", str(cache_dir), *flags]
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = open(run_dir / "train.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(trainer.parent))


def read_metrics(csv_path: Path) -> dict[str, np.ndarray]:
    """metrics.csv -> column name -> float array (empty cells are nan)."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cols = rows[0].keys() if rows else []
    return {c: np.array([float(r[c]) if r[c] not in ("", None) else math.nan for r in rows]) for c in cols}


def loss_stats(m: dict[str, np.ndarray], lpl_weight: float) -> dict:
    """Mean diffusion loss, mean LPL loss over the steps where LPL was applied, LPL/diffusion ratios and the
    median time per step (from the trainer's ``elapsed_s``)."""
    diff = m["diffusion_loss"]
    out = {"diffusion_loss_mean": float(np.nanmean(diff))}
    if "lpl_applied_ratio" in m and np.nanmax(np.nan_to_num(m["lpl_applied_ratio"])) > 0:
        applied = np.nan_to_num(m["lpl_applied_ratio"]) > 0
        lpl = m["lpl_loss"]
        out["lpl_loss_mean_when_applied"] = float(np.nanmean(lpl[applied]))
        out["lpl_applied_step_fraction"] = float(applied.mean())
        out["lpl_applied_sample_fraction"] = float(np.nanmean(m["lpl_applied_ratio"]))
        # weighted LPL term / diffusion loss, on the steps that had LPL samples, and over all steps
        out["lpl_to_diffusion_when_applied"] = float(np.nanmean(lpl_weight * lpl[applied] / diff[applied]))
        out["lpl_to_diffusion_overall"] = float(np.nansum(lpl_weight * np.nan_to_num(lpl)) / np.nansum(diff))
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


def evaluate_pipeline(model_dir: Path, num_images: int, seed: int, out_dir: Path) -> dict:
    """Sample the evaluation prompts with the pipeline saved in ``model_dir`` into ``out_dir/eval_grid.png``
    (rows: prompts, ``num_images`` columns) and score them (:func:`score_grid`)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from lpl_ext.demo import image_metrics as im

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32,
                                                     local_files_only=True)
    prompts = im.evaluation_prompts()
    images, _ = im.generate(pipe, prompts, num_images, seed)
    save_grid(images, len(prompts), num_images, out_dir / "eval_grid.png")
    (out_dir / "eval_settings.json").write_text(json.dumps({"images_per_prompt": num_images, "seed": seed}) + "\n")
    return score_grid(out_dir)


def score_grid(out_dir: Path) -> dict:
    """Score the images of ``out_dir/eval_grid.png`` (lossless PNG: the tiles are the generated images) with
    ``lpl_ext.demo.image_metrics``; writes and returns ``eval.json`` (summary and per-prompt summaries)."""
    from PIL import Image

    from lpl_ext.demo import image_metrics as im

    settings = json.loads((out_dir / "eval_settings.json").read_text())
    cols = settings["images_per_prompt"]
    prompts = im.evaluation_prompts()
    grid = Image.open(out_dir / "eval_grid.png").convert("RGB")
    tile_w, tile_h = grid.width // cols, grid.height // len(prompts)
    images = [grid.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
              for r in range(len(prompts)) for c in range(cols)]
    captions = [p for p in prompts for _ in range(cols)]
    scores = im.score_images(images, captions)
    result = {"summary": im.summarize(scores),
              "per_prompt": {p: im.summarize([s for s in scores if s["caption"] == p]) for p in prompts},
              **settings}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def save_grid(images: list, rows: int, cols: int, path: Path) -> None:
    """Paste ``rows * cols`` equally sized PIL images into one PNG (row-major)."""
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def load_trainer(trainer: Path):
    """Import ``train_sdxl_lpl.py`` from its path as a module (the probe reuses its loss code)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_sdxl_lpl_for_experiment", trainer)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def gradient_probe(trainer: Path, model_dir: Path, arm_flags: list[str], common: list[str], *,
                   num_batches: int = 4, batch_size: int = 32, below_threshold_only: bool = False,
                   seed: int = 0) -> dict:
    """How large is LPL's push on the UNet compared with the diffusion loss's, at the base?

    Uses the trainer's own ``compute_losses`` and ``build_lpl_objective`` on ``num_batches`` batches of the
    built-in data: the gradient of the UNet parameters with the arm's ``--lpl_weight`` minus the gradient with
    weight 0 (same noise and timesteps) is the weighted LPL gradient. Returns the mean over batches of
    ``|g_lpl| / |g_diff|`` and of their cosine. ``below_threshold_only`` draws every timestep below the
    arm's ``--lpl_t_threshold`` (the samples LPL acts on) instead of uniformly.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lpl_ext.demo import synthetic_data as sd

    tr = load_trainer(trainer)
    args = tr.parse_args(["--output_dir", str(model_dir / "_probe"), *common, *arm_flags])
    weight = args.lpl_weight
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae").eval()
    tok = [CLIPTokenizer.from_pretrained(str(model_dir), subfolder=f) for f in ("tokenizer", "tokenizer_2")]
    te = [CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder"),
          CLIPTextModelWithProjection.from_pretrained(str(model_dir), subfolder="text_encoder_2")]
    sched = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    alphas_cumprod = sched.alphas_cumprod.float()
    objective = tr.build_lpl_objective(args, vae)
    probs = None
    if below_threshold_only:
        probs = torch.zeros(sched.config.num_train_timesteps)
        probs[:args.lpl_t_threshold] = 1.0 / args.lpl_t_threshold
    ratios, cosines = [], []
    gen_data = torch.Generator().manual_seed(seed)
    for b in range(num_batches):
        idx = torch.randint(0, sd.num_distinct_examples(), (batch_size,), generator=gen_data).tolist()
        pixels, captions = [], []
        for i in idx:
            img, cap = sd.draw_example(i)
            arr = np.asarray(img.crop((8, 0, 72, 64)), dtype=np.float32)
            pixels.append(torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0)
            captions.append(cap)
        latents = tr.encode_latents(vae, torch.stack(pixels), torch.Generator().manual_seed(seed + b))
        ids = [t(captions, padding="max_length", max_length=t.model_max_length, truncation=True,
                 return_tensors="pt").input_ids for t in tok]
        embeds, pooled = tr.encode_prompts(te, ids)
        time_ids = torch.tensor([[64.0, 80.0, 0.0, 8.0, 64.0, 64.0]]).repeat(batch_size, 1)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 100 + b))
        grads = []
        for w in (weight, 0.0):
            args.lpl_weight = w
            unet.zero_grad(set_to_none=True)
            loss, _ = tr.compute_losses(
                unet=unet, batch_latents=latents, noise=noise, prompt_embeds=embeds, pooled_embeds=pooled,
                add_time_ids=time_ids, noise_scheduler=sched, prediction_type="epsilon", args=args,
                lpl_objective=objective, global_step=10 ** 6, alphas_cumprod=alphas_cumprod,
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


def pixel_differences(out: Path, arms: list[str], seeds: list[int]) -> dict:
    """Mean absolute difference (0..255) between the evaluation grids of each arm and of ``off`` trained with
    the same seed (same sampling seeds), and between ``off`` runs of different training seeds: how much an
    arm changes the pictures, against the run-to-run spread."""
    from PIL import Image

    def grid(arm: str, s: int) -> np.ndarray:
        return np.asarray(Image.open(out / "runs" / arm / f"seed{s}" / "eval_grid.png").convert("RGB"), np.float32)

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


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (ddof 1; 0 for one value) of the finite values, with their count."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def lpl_weight_of(flags: list[str]) -> float:
    return float(flags[flags.index("--lpl_weight") + 1]) if "--lpl_weight" in flags else 0.0


def aggregate(results: dict, arms: list[str], seeds: list[int]) -> dict:
    """Per arm: mean/std over seeds of every image metric and loss statistic."""
    out = {}
    for arm in arms:
        runs = [results["runs"][arm][str(s)] for s in seeds if str(s) in results["runs"].get(arm, {})]
        agg = {"seeds": [s for s in seeds if str(s) in results["runs"].get(arm, {})]}
        for key in METRICS:
            agg[key] = mean_std([r["eval"]["summary"][key] for r in runs])
        loss_keys = sorted({k for r in runs for k in r["losses"]})
        for key in loss_keys:
            agg[key] = mean_std([r["losses"].get(key, math.nan) for r in runs])
        out[arm] = agg
    return out


def fmt(ms: dict, digits: int = 3, pct: bool = False) -> str:
    if not ms or ms["n"] == 0:
        return "-"
    if pct:
        return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"
    return f"{ms['mean']:.{digits}g} ± {ms['std']:.{digits}g}" if ms["std"] else f"{ms['mean']:.{digits}g}"


def markdown_tables(results: dict) -> str:
    """The result tables in Markdown (percentages for accuracies)."""
    agg, base = results["arms"], results["base"]["summary"]
    lines = [
        "| arm | seeds | all right % | fg colour % | bg colour % | shape % | size % | shape IoU | edge width px "
        "| fg colour error |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {ARM_LABELS['base']} | - | {100 * base['all_acc']:.1f} | {100 * base['fg_acc']:.1f} | "
        f"{100 * base['bg_acc']:.1f} | {100 * base['shape_acc']:.1f} | {100 * base['size_acc']:.1f} | "
        f"{base['shape_iou']:.3f} | {base['edge_width_px']:.2f} | {base['fg_error']:.1f} |",
    ]
    for arm, a in agg.items():
        lines.append(
            f"| {ARM_LABELS.get(arm, arm)} | {','.join(map(str, a['seeds']))} | {fmt(a['all_acc'], pct=True)} | "
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
    lines += ["", "| arm | diffusion loss | LPL loss (steps with LPL) | weighted LPL / diffusion (those steps) "
              "| weighted LPL / diffusion (all steps) | steps with LPL % | s / step (median) "
              "| s / step, steps with / without LPL samples |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, a in agg.items():
        lines.append(
            f"| {ARM_LABELS.get(arm, arm)} | {fmt(a.get('diffusion_loss_mean'))} | "
            f"{fmt(a.get('lpl_loss_mean_when_applied'))} | {fmt(a.get('lpl_to_diffusion_when_applied'))} | "
            f"{fmt(a.get('lpl_to_diffusion_overall'))} | {fmt(a.get('lpl_applied_step_fraction'), pct=True)} | "
            f"{fmt(a.get('s_per_step_median'))} | "
            f"{fmt(a.get('s_per_step_with_lpl'))} / {fmt(a.get('s_per_step_without_lpl'))} |")
    pix = results.get("pixel_difference_to_off", {})
    if pix:
        lines += ["", "| arm | mean abs. pixel difference (0-255) of its samples to LPL off, same training seed |",
                  "|---|---|"]
        lines += [f"| {ARM_LABELS.get(arm, arm)} | {fmt(pix[arm])} |" for arm in agg if arm in pix]
        if "off_between_seeds" in pix:
            lines.append(f"| (LPL off, between training seeds) | {fmt(pix['off_between_seeds'])} |")
    probes = results.get("gradient_probe", {})
    if probes:
        lines += ["", "| arm | weighted LPL grad / diffusion grad (t uniform) | cosine | "
                  "same, every t below the threshold | cosine |", "|---|---|---|---|---|"]
        for arm in agg:
            u, b = probes.get(f"{arm}/uniform_t"), probes.get(f"{arm}/below_threshold")
            if u and b:
                lines.append(f"| {ARM_LABELS.get(arm, arm)} | {fmt(u['grad_norm_ratio'])} | {fmt(u['grad_cosine'])} | "
                             f"{fmt(b['grad_norm_ratio'])} | {fmt(b['grad_cosine'])} |")
    return "\n".join(lines) + "\n"


def plot_samples(out: Path, arms: list[str], seed: int, rows: int, cols: int, path: Path) -> None:
    """Side-by-side sample grids (first ``rows`` prompts, ``cols`` images each) of the base and each arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from lpl_ext.demo import image_metrics as im

    panels = [("base", out / "base" / "eval_grid.png")] + [
        (arm, out / "runs" / arm / f"seed{seed}" / "eval_grid.png") for arm in arms]
    fig, axes = plt.subplots(1, len(panels), figsize=(0.75 * cols * len(panels) + 2.6, 0.75 * rows + 0.9))
    for ax, (name, grid_path) in zip(np.atleast_1d(axes), panels):
        grid = Image.open(grid_path)
        tile = grid.height // len(im.evaluation_prompts())
        ax.imshow(np.asarray(grid.crop((0, 0, cols * tile, rows * tile))), interpolation="nearest")
        ax.set_title(ARM_LABELS.get(name, name), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([(r + 0.5) * tile for r in range(rows)] if name == "base" else [])
        if name == "base":
            ax.set_yticklabels([p.replace("a ", "", 1).replace(" on a ", " on ").replace(" background", "")
                                for p in im.evaluation_prompts()[:rows]], fontsize=7)
    fig.suptitle(f"samples after fine-tuning\n(training seed {seed}; same sampling seeds in every panel)",
                 fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110)
    plt.close(fig)
    # 256-colour PNG: the panels hold few colours; keeps the committed figure small.
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def plot_curves(out: Path, results: dict, arms: list[str], seeds: list[int], path: Path) -> None:
    """Loss curves (mean over seeds, smoothed) and the main metrics per arm (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        axes[0].plot(steps, np.nanmean(diffs, 0), color=colors[a_idx], label=ARM_LABELS.get(arm, arm))
        if lpls:
            axes[1].plot(steps, np.nanmean(lpls, 0), color=colors[a_idx], label=ARM_LABELS.get(arm, arm))
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
        ax.set_xticklabels([ARM_LABELS.get(n, n) for n in names], rotation=25, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if key == "edge_width_px" and "dataset_reference" in results:
            ax.axhline(results["dataset_reference"]["vae"]["edge_width_px"], color="k", ls="--", lw=1,
                       label="dataset through the VAE")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=str, required=True, help="Experiment folder (outside the repository).")
    p.add_argument("--trainer", type=str, default=str(ROOT / "train_sdxl_lpl.py"))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="Arms: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in ARMS.items()))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_examples", type=int, default=256, help="--num_synthetic_examples of the trainer.")
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--trainer_args", type=str, default="", help="Extra trainer flags for every arm (one string).")
    p.add_argument("--eval_images", type=int, default=4, help="Images per evaluation prompt.")
    p.add_argument("--eval_seed", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1, help="Training runs in parallel.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per training run.")
    p.add_argument("--figures", type=str, default=None,
                   help="Folder for experiment_samples.png / experiment_curves.png (default: --out).")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_examples", "eval_images", "jobs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    trainer = Path(args.trainer).resolve()
    if not trainer.is_file():
        p.error(f"--trainer {trainer} does not exist")

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(args.threads * args.jobs)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from lpl_ext.demo import image_metrics as im
    from lpl_ext.demo import tiny_sdxl as ts

    out = Path(args.out).resolve()
    cache = out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    base_dir = ts.ensure_tiny_sdxl(cache)
    if not (out / "base" / "eval.json").is_file():
        evaluate_pipeline(base_dir, args.eval_images, args.eval_seed, out / "base")

    # Seed-major order: with --jobs > 1 the arms share the machine alike, so their step times compare.
    pending = [(arm, s) for s in args.seeds for arm in args.arms
               if not (out / "runs" / arm / f"seed{s}" / DONE_MARKER).is_file()]
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failures = []
    while pending or running:
        while pending and len(running) < args.jobs:
            arm, s = pending.pop(0)
            run_dir = out / "runs" / arm / f"seed{s}"
            flags = common_flags(args) + ARMS[arm]
            running.append((arm, s, run_trainer(trainer, run_dir, s, flags, cache, args.threads), time.time()))
            print(f"[{time.time() - t_start:6.0f}s] started {arm} seed {s}", flush=True)
        time.sleep(2)
        for item in list(running):
            arm, s, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            run_dir = out / "runs" / arm / f"seed{s}"
            if proc.returncode != 0:
                failures.append(f"{arm} seed {s}: exit {proc.returncode} (see {run_dir / 'train.log'})")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            wall = time.time() - t0
            evaluation = evaluate_pipeline(run_dir, args.eval_images, args.eval_seed, run_dir)
            flags = common_flags(args) + ARMS[arm]
            record = {"arm": arm, "seed": s, "wall_s": round(wall, 1),
                      "losses": loss_stats(read_metrics(run_dir / "metrics.csv"), lpl_weight_of(flags)),
                      "eval": {"summary": evaluation["summary"]}}
            (run_dir / DONE_MARKER).write_text(json.dumps(record, indent=1) + "\n")
            print(f"[{time.time() - t_start:6.0f}s] done {arm} seed {s} in {wall:.0f}s: "
                  f"all {evaluation['summary']['all_acc']:.2f} edge {evaluation['summary']['edge_width_px']:.2f}",
                  flush=True)
    if failures:
        raise SystemExit("runs failed:\n" + "\n".join(failures))

    results = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "settings": {k: v for k, v in vars(args).items()},
        "common_trainer_flags": common_flags(args),
        "arm_flags": {a: ARMS[a] for a in args.arms},
        "base": score_grid(out / "base"),
        "runs": {arm: {str(s): json.loads((out / "runs" / arm / f"seed{s}" / DONE_MARKER).read_text())
                       for s in args.seeds} for arm in args.arms},
    }
    for arm in args.arms:  # scores and loss statistics from the saved grids and metrics files, so a change of
        for s in args.seeds:  # lpl_ext.demo.image_metrics or loss_stats applies to finished runs too
            run = results["runs"][arm][str(s)]
            run["eval"] = {"summary": score_grid(out / "runs" / arm / f"seed{s}")["summary"]}
            run["losses"] = loss_stats(read_metrics(out / "runs" / arm / f"seed{s}" / "metrics.csv"),
                                       lpl_weight_of(common_flags(args) + ARMS[arm]))
    results["arms"] = aggregate(results, args.arms, args.seeds)
    results["pixel_difference_to_off"] = pixel_differences(out, args.arms, args.seeds)
    probe_path = out / "gradient_probe.json"
    probes = json.loads(probe_path.read_text()) if probe_path.is_file() else {}
    for arm in args.arms:
        if "--use_lpl" not in ARMS[arm]:
            continue
        for below in (False, True):
            key = f"{arm}/{'below_threshold' if below else 'uniform_t'}"
            if key not in probes:
                probes[key] = gradient_probe(trainer, base_dir, ARMS[arm], common_flags(args),
                                             below_threshold_only=below)
                probe_path.write_text(json.dumps(probes, indent=1) + "\n")
    results["gradient_probe"] = probes
    results["dataset_reference"] = im.dataset_reference(64, vae=ts.build_tiny_vae().eval())
    results["wall_s"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    tables = markdown_tables(results)
    (out / "results.md").write_text(tables)
    figures = Path(args.figures) if args.figures else out
    figures.mkdir(parents=True, exist_ok=True)
    plot_samples(out, args.arms, args.seeds[0], rows=len(im.evaluation_prompts()), cols=min(2, args.eval_images),
                 path=figures / "experiment_samples.png")
    plot_curves(out, results, args.arms, args.seeds, figures / "experiment_curves.png")
    print(tables)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {figures / 'experiment_samples.png'}, "
          f"{figures / 'experiment_curves.png'} ({results['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
