"""Benches through a whole VAE decoder: an AutoencoderKL built from the SDXL VAE config with
random weights (or a tiny one of the same block structure); nothing is downloaded. The
loss flags are the recommended ones (mse, shared norm, pow_law, 4 up blocks, outliers).

- ``decoder`` (CSV): ``get_loss`` + backward, the plain-PyTorch restatement of the
  reference class (tests/reference_lpl.py) vs ``lpl_ext.LatentPerceptualLoss``.
- ``vae_memory``: peak RSS of one ``get_loss`` + backward at 512px per loss variant
  (reference, lpl_ext, lpl_ext_block = checkpoint_granularity "block", compat =
  reference_compat), each in a fresh process: ru_maxrss before the call (VAE built,
  inputs allocated), after, and the difference.
- ``sync_free``: ``LPLObjective``'s default selection (one host sync, decodes only the
  samples below ``t_threshold``) vs ``sync_free=True`` (decodes the whole batch) and
  ``capacity`` (half the batch), objective + backward per training step: median wall and
  process-CPU time with the variants interleaved in one process, and the peak extra
  memory of one step after a warm-up, each variant alone in a fresh process.
- ``loss_scale``: lpl_ext's default loss against the reference's arithmetic
  (``reference_compat=True``, checked against tests/reference_lpl.py) on pairs z0_hat =
  z0 + sigma * noise: mean losses, their ratio and the ratio of the gradient norms
  (what an ``lpl_weight`` tuned on the reference must be rescaled by).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from benchmarks import common
from benchmarks.bench_head import PYRAMID, HeadWorkload

VARIANTS = ("reference", "lpl_ext")
MEMORY_VARIANTS = ("reference", "lpl_ext", "lpl_ext_block", "compat")
SYNC_FREE_VARIANTS = ("default", "sync_free", "capacity")
FLAGS: Dict[str, Any] = dict(loss_type="mse", norm_type="shared", pow_law=True, num_mid_blocks=4,
                             remove_outliers=True, grad_ckpt=False)
SIGMAS = (0.05, 0.1, 0.3)
T_THRESHOLD = 200

# The SDXL VAE architecture (diffusers AutoencoderKL config of sdxl-vae).
SDXL_VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
)
# Micro architecture for quick runs (same block structure, few channels).
TINY_VAE_CONFIG: Dict[str, Any] = dict(SDXL_VAE_CONFIG, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                                       layers_per_block=1)


@dataclass(frozen=True)
class DecoderWorkload:
    resolution: int
    batch: int
    arch: str = "sdxl"  # "sdxl" or "tiny"
    grad_ckpt: bool = False

    @property
    def name(self) -> str:
        return f"{self.arch}_vae_{self.resolution}px_b{self.batch}{'_ckpt' if self.grad_ckpt else ''}"

    def feature_bytes(self) -> int:
        """Bytes of the prediction and target feature pyramids (SDXL channel counts)."""
        return HeadWorkload(self.resolution, self.batch, PYRAMID).feature_bytes() if self.arch == "sdxl" else 0

    def shape_text(self, bench: str = "decoder") -> str:
        lat = self.resolution // 8
        text = f"latents {self.batch}x4x{lat}x{lat}, {self.arch} decoder, "
        if bench == "decoder":
            return text + "shared mse outliers pow_law"
        below = sum(t < T_THRESHOLD for t in self.timesteps())
        return text + f"{below}/{self.batch} below t={T_THRESHOLD}, capacity {self.capacity}"

    @property
    def capacity(self) -> int:
        """sync_free's ``capacity`` variant: half the batch (twice the expected number of
        qualifying samples)."""
        return max(1, self.batch // 2)

    def timesteps(self) -> List[int]:
        """sync_free: a quarter of the batch below the threshold, spread over the batch."""
        return [(50, 400, 700, 950)[i % 4] for i in range(self.batch)]


def workloads(bench: str, mode: str) -> List[DecoderWorkload]:
    """The grid of 'decoder' or 'sync_free' in a run mode ('quick', 'full' or 'gpu')."""
    if mode == "quick":
        return [DecoderWorkload(64, 1 if bench == "decoder" else 8, "tiny")]
    if bench == "decoder":
        if mode == "gpu":
            return [DecoderWorkload(1024, 1, grad_ckpt=True), DecoderWorkload(512, 4, grad_ckpt=True)]
        return [DecoderWorkload(256, 1)]
    if mode == "gpu":
        return [DecoderWorkload(64, 8, "tiny"), DecoderWorkload(512, 8), DecoderWorkload(1024, 4)]
    return [DecoderWorkload(64, 8, "tiny"), DecoderWorkload(128, 4)]


def build_vae(arch: str, device: str, seed: int = 0) -> Any:
    """Randomly initialised AutoencoderKL of the given architecture, frozen, eval mode."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**(SDXL_VAE_CONFIG if arch == "sdxl" else TINY_VAE_CONFIG)).eval().to(device)
    return vae.requires_grad_(False)


def build_loss(variant: str, vae: Any, grad_ckpt: bool) -> Any:
    """One of MEMORY_VARIANTS at FLAGS."""
    flags = dict(FLAGS, grad_ckpt=grad_ckpt)
    if variant == "reference":
        return common.tests_module("reference_lpl").ReferenceLPL(vae, **flags)
    import lpl_ext

    return lpl_ext.LatentPerceptualLoss(vae, reference_compat=variant == "compat",
                                        checkpoint_granularity="block" if variant == "lpl_ext_block" else "module",
                                        **flags)


def latents(batch: int, resolution: int, device: str) -> Any:
    """(prediction requiring grad, target): target standard normal, prediction = target +
    0.3 noise, both (batch, 4, res/8, res/8)."""
    import torch

    lat = resolution // 8
    gen = torch.Generator(device=device).manual_seed(1)
    target = torch.randn(batch, 4, lat, lat, generator=gen, device=device)
    return (target + 0.3 * torch.randn(target.shape, generator=gen, device=device)).requires_grad_(True), target


# ---------------------------------------------------------------------------- decoder (CSV)

def measure(bench: str, variant: str, workload: str, mode: str, device: str, env: Dict[str, Any],
            bandwidth: Optional[float], reps: int, budget: float) -> List[Dict[str, Any]]:
    """Worker side (common.run_grid): get_loss + backward of one variant, one row. Compute
    bound: no bandwidth floor."""
    wl = next(w for w in workloads(bench, mode) if w.name == workload)

    def row() -> Dict[str, Any]:
        r = common.base_row(env, bench, wl.name, variant)
        r.update(shape=wl.shape_text(), dtype="float32")
        why = common.missing("diffusers", "reference_lpl" if variant == "reference" else "lpl_ext")
        if why:
            r.update(status="skipped", note=why)
            return r
        loss_mod = build_loss(variant, build_vae(wl.arch, device), wl.grad_ckpt)
        pred, target = latents(wl.batch, wl.resolution, device)

        def drop() -> None:
            pred.grad = None

        r = common.measure_row(r, lambda: loss_mod.get_loss(pred, target).mean().backward(), device, reps, budget,
                               drop, wl.feature_bytes(), 0, None)
        r.update(values_per_side=wl.feature_bytes() // 8 or "", floor_bytes="")
        return r

    return [common.safe_row(env, bench, workload, variant, wl.shape_text(), row)]


# ---------------------------------------------------------------------------- vae_memory

def vae_memory(variant: str, res: int, grad_ckpt: bool) -> List[Dict[str, Any]]:
    """Worker side: one get_loss + backward of ``variant`` at batch 1, its ru_maxrss
    figures, times and loss."""
    import resource

    import torch

    def maxrss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    loss_fn = build_loss(variant, build_vae("sdxl", "cpu"), grad_ckpt)
    pred, target = latents(1, res, "cpu")
    before = maxrss_mib()
    t0 = time.perf_counter()
    loss = loss_fn.get_loss(pred, target)
    t1 = time.perf_counter()
    loss.sum().backward()
    t2 = time.perf_counter()
    peak = maxrss_mib()
    return [{"variant": variant, "res": res, "grad_ckpt": grad_ckpt, "loss": float(loss.detach().sum()),
             "grad_abs_sum": float(pred.grad.abs().sum()), "rss_before_mib": round(before, 1),
             "rss_peak_mib": round(peak, 1), "loss_peak_mib": round(peak - before, 1),
             "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
             "torch_threads": torch.get_num_threads()}]


def run_vae_memory(variants: Sequence[str], res: int, no_ckpt: bool, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Every variant with checkpointing (and, with ``no_ckpt``, without), each in a fresh
    process."""
    rows = []
    for ckpt in ([True, False] if no_ckpt else [True]):
        for variant in variants:
            got, failure = common.run_in_worker("benchmarks.bench_decoder:vae_memory", variant=variant, res=res,
                                                grad_ckpt=ckpt)
            if not got:
                log(f"{variant:10s} ckpt={int(ckpt)} res={res}: failed: {failure}")
                continue
            r = got[0]
            log(f"{variant:10s} ckpt={int(ckpt)} res={res}: peak RSS {r['rss_peak_mib']:8.1f} MiB "
                f"(before call {r['rss_before_mib']:7.1f}, loss+backward {r['loss_peak_mib']:8.1f}) "
                f"fwd {r['forward_s']:6.1f}s bwd {r['backward_s']:6.1f}s loss {r['loss']:.6g}")
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------- sync_free

def sync_free_steps(wl: DecoderWorkload, device: str, variants: Sequence[str]) -> Dict[str, Callable[[], None]]:
    """One training-step closure per variant over the same VAE and batch (objective +
    backward; the prediction's .grad is dropped before each step). Epsilon prediction,
    SDXL noise schedule, the objective's defaults otherwise."""
    import torch
    from diffusers import DDPMScheduler

    from lpl_ext import LPLObjective

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
    options = {"default": {}, "sync_free": dict(sync_free=True), "capacity": dict(sync_free=True, capacity=wl.capacity)}

    def make_step(obj: Any) -> Callable[[], None]:
        def step() -> None:
            pred.grad = None
            lpl, _ = obj(pred, zt, z0, t, prediction_type="epsilon", alphas_cumprod=ac)
            lpl.backward()
        return step

    return {v: make_step(LPLObjective(vae, t_threshold=T_THRESHOLD, **options[v])) for v in variants}


def sync_free_time(workload: str, mode: str, device: str, variants: List[str], reps: int,
                   threads: int) -> List[Dict[str, Any]]:
    """Worker side: median wall and process-CPU time per variant, interleaved."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    wl = next(w for w in workloads("sync_free", mode) if w.name == workload)
    times = common.time_interleaved(sync_free_steps(wl, device, variants), device, reps)
    return [{"workload": wl.name, "variant": v, "wall_ms": 1e3 * statistics.median(wall),
             "cpu_ms": 1e3 * statistics.median(cpu), "reps": reps} for v, (wall, cpu, _) in times.items()]


def sync_free_memory(workload: str, mode: str, device: str, variant: str, threads: int) -> List[Dict[str, Any]]:
    """Worker side: peak extra memory of one step after a warm-up step, alone in this process."""
    import torch

    torch.set_num_threads(threads)
    wl = next(w for w in workloads("sync_free", mode) if w.name == workload)
    step = sync_free_steps(wl, device, [variant])[variant]
    step()
    mem = common.PeakMemory(device)
    mem.start()
    step()
    return [{"workload": wl.name, "variant": variant, "extra_mib": mem.stop() / 2**20, "approximate": mem.approximate}]


def run_sync_free(mode: str, device: str, variants: Sequence[str], reps: int, threads: int,
                  log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Per workload: one timing process (variants interleaved) and one memory process per
    variant. One merged row per (workload, variant)."""
    rows: List[Dict[str, Any]] = []
    for wl in workloads("sync_free", mode):
        log(f"[sync_free] {wl.name}: {wl.shape_text('sync_free')}")
        args = dict(workload=wl.name, mode=mode, device=device, threads=threads)
        got, failure = common.run_in_worker("benchmarks.bench_decoder:sync_free_time", variants=list(variants),
                                            reps=reps, **args)
        timing = {r["variant"]: r for r in got}
        for v in variants:
            mem_rows, mem_failure = common.run_in_worker("benchmarks.bench_decoder:sync_free_memory", variant=v,
                                                         **args)
            row: Dict[str, Any] = {"workload": wl.name, "shape": wl.shape_text("sync_free"), "variant": v}
            row.update(timing.get(v, {"error": failure or "no timing row"}))
            row.update(mem_rows[0] if mem_rows else {"mem_error": mem_failure or "no memory row"})
            log(f"  {v:<10} wall {row.get('wall_ms', float('nan')):.1f} ms  cpu {row.get('cpu_ms', float('nan')):.1f} ms"
                f"  extra {row.get('extra_mib', float('nan')):.1f} MiB")
            rows.append(row)
    return rows


def sync_free_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: per workload and variant, median wall and CPU time and peak extra memory,
    each also relative to the default."""
    nan = float("nan")
    base = {r["workload"]: r for r in rows if r["variant"] == "default"}

    def rel(r: Dict[str, Any], key: str) -> str:
        b = base.get(r["workload"], {})
        return f"{r[key] / b[key]:.2f}x" if key in r and b.get(key) else ""

    return "\n".join(["| workload | variant | wall ms | CPU ms | CPU vs default | extra MiB | vs default |",
                      "|---|---|---:|---:|---:|---:|---:|"] + [
        f"| {r['workload']} | {r['variant']} | {r.get('wall_ms', nan):.0f} | {r.get('cpu_ms', nan):.0f} | "
        f"{rel(r, 'cpu_ms')} | {r.get('extra_mib', nan):.1f} | {rel(r, 'extra_mib')} |" for r in rows])


# ---------------------------------------------------------------------------- loss_scale

def loss_scale(res: int = 128, batch: int = 4, seed: int = 0, tiny: bool = False,
               vae: Optional[str] = None) -> List[Dict[str, Any]]:
    """In process, per sigma of SIGMAS: the mean per-sample loss of lpl_ext's default
    module and of ``reference_compat=True`` at FLAGS, their ratio, the ratio of the
    gradient norms ||dL/dz0_hat||, and (when tests/reference_lpl.py is importable) the
    restatement's loss. VAE: a local diffusers AutoencoderKL folder (``vae``), lpl_ext's
    tiny pretrained VAE on latents of its synthetic shapes (``tiny``), or the SDXL
    architecture with random weights; latents random normal unless ``tiny``."""
    import numpy as np
    import torch

    from lpl_ext import LatentPerceptualLoss

    if res % 8 or res < 32:
        raise ValueError(f"res: expected a multiple of 8 >= 32, got {res}")
    if vae:
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(vae, local_files_only=True).eval().float()
    elif tiny:
        from lpl_ext.demo.tiny_sdxl import build_tiny_vae

        model = build_tiny_vae(pretrained=True).eval()
    else:
        model = build_vae("sdxl", "cpu", seed=seed)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    if tiny:
        from lpl_ext.demo.synthetic_data import draw_example

        images = [np.asarray(draw_example(i, width=res, height=res)[0].convert("RGB"), dtype=np.float32)
                  for i in range(batch)]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
        with torch.no_grad():
            z0 = model.encode(pixels).latent_dist.mean * model.config.scaling_factor
    else:
        z0 = torch.randn(batch, model.config.latent_channels, res // 8, res // 8, generator=g)
    modules = {"lpl_ext": LatentPerceptualLoss(model, reference_compat=False, **FLAGS),
               "reference": LatentPerceptualLoss(model, reference_compat=True, **FLAGS)}
    restatement = None if common.missing("reference_lpl") else build_loss("reference", model, False)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for sigma in SIGMAS:
        z_hat = (z0 + sigma * torch.randn(z0.shape, generator=g)).requires_grad_(True)
        out: Dict[str, Any] = {"sigma": sigma}
        for name, mod in modules.items():
            loss = mod.get_loss(z_hat, z0)
            (grad,) = torch.autograd.grad(loss.mean(), z_hat)
            out[f"{name}_loss"] = float(loss.detach().mean())
            out[f"{name}_grad"] = float(grad.norm())
        if restatement is not None:
            out["restatement_loss"] = float(restatement.get_loss(z_hat.detach(), z0).mean())
        out["loss_ratio"] = out["lpl_ext_loss"] / out["reference_loss"]
        out["grad_ratio"] = out["lpl_ext_grad"] / out["reference_grad"]
        rows.append(out)
    return rows


def loss_scale_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: per sigma, both losses (and the restatement's), the loss and gradient-norm ratios."""
    lines = ["| sigma | reference loss | lpl_ext loss | loss ratio | grad-norm ratio |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        check = f" (restatement {r['restatement_loss']:.6g})" if "restatement_loss" in r else ""
        lines.append(f"| {r['sigma']} | {r['reference_loss']:.6g}{check} | {r['lpl_ext_loss']:.6g} | "
                     f"{r['loss_ratio']:.3f} | {r['grad_ratio']:.3f} |")
    return "\n".join(lines)
