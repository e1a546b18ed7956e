"""Full LPL ``get_loss`` + backward through an SDXL-sized AutoencoderKL decoder (random
weights, built from the SDXL VAE config; nothing is downloaded): the plain-PyTorch
restatement of the reference class (tests/reference_lpl.py) vs
``lpl_ext.LatentPerceptualLoss``. Options: mse, shared norm, pow_law, 4 up blocks,
outliers removed, no gradient checkpointing on CPU (checkpointing on GPU).

    python -m benchmarks.bench_decoder [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.bench_head import HeadWorkload

BENCH = "decoder"
VARIANTS = ("reference", "lpl_ext")

# The SDXL VAE architecture (diffusers AutoencoderKL config of sdxl-vae).
SDXL_VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
)
# Micro architecture for --quick (same block structure, few channels).
TINY_VAE_CONFIG: Dict[str, Any] = dict(SDXL_VAE_CONFIG, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                                       layers_per_block=1)


@dataclass(frozen=True)
class DecoderWorkload:
    resolution: int
    batch: int
    arch: str = "sdxl"  # "sdxl" or "tiny"
    grad_ckpt: bool = False
    norm: str = "shared"
    loss: str = "mse"

    @property
    def name(self) -> str:
        return f"{self.arch}_vae_{self.resolution}px_b{self.batch}{'_ckpt' if self.grad_ckpt else ''}"

    def feature_bytes(self) -> int:
        """Bytes of the prediction and target feature pyramids (SDXL channel counts)."""
        if self.arch != "sdxl":
            return 0
        return HeadWorkload(self.resolution, self.batch, tuple(range(5))).feature_bytes()

    def shape_text(self) -> str:
        lat = self.resolution // 8
        return f"latents {self.batch}x4x{lat}x{lat}, {self.arch} decoder, {self.norm} {self.loss} outliers pow_law"


def workloads(mode: str, device: str = "cpu") -> List[DecoderWorkload]:
    if mode == "quick":
        return [DecoderWorkload(64, 1, "tiny")]
    if mode == "gpu" or device.startswith("cuda"):
        return [DecoderWorkload(1024, 1, "sdxl", grad_ckpt=True), DecoderWorkload(512, 4, "sdxl", grad_ckpt=True)]
    return [DecoderWorkload(256, 1, "sdxl")]


def build_vae(arch: str, device: str, seed: int = 0) -> Any:
    """Randomly initialised AutoencoderKL of the given architecture, frozen, eval mode."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = SDXL_VAE_CONFIG if arch == "sdxl" else TINY_VAE_CONFIG
    vae = AutoencoderKL(**cfg).eval().to(device)
    vae.requires_grad_(False)
    return vae


def reference_class() -> Any:
    """tests/reference_lpl.py's restatement of the reference class, or None."""
    tests_dir = str(common.REPO / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    try:
        import reference_lpl  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    for name in ("ReferenceLPL", "ReferenceLatentPerceptualLoss", "LatentPerceptualLoss"):
        if hasattr(reference_lpl, name):
            return getattr(reference_lpl, name)
    return None


def missing_piece(variant: str) -> Optional[str]:
    try:
        import diffusers  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"diffusers not importable ({type(exc).__name__})"
    if variant == "reference" and reference_class() is None:
        return "tests/reference_lpl.py reference class not available"
    if variant == "lpl_ext":
        try:
            import lpl_ext
        except Exception as exc:  # noqa: BLE001
            return f"lpl_ext not importable ({type(exc).__name__}: {exc})"
        if not hasattr(lpl_ext, "LatentPerceptualLoss"):
            return "lpl_ext.LatentPerceptualLoss not available"
    return None


def build_loss(variant: str, vae: Any, wl: DecoderWorkload) -> Any:
    kwargs = dict(loss_type=wl.loss, grad_ckpt=wl.grad_ckpt, pow_law=True, norm_type=wl.norm, num_mid_blocks=4,
                  feature_type="feature", remove_outliers=True)
    if variant == "reference":
        return reference_class()(vae, **kwargs)
    import lpl_ext

    return lpl_ext.LatentPerceptualLoss(vae, **kwargs)


def measure(variant: str, wl: DecoderWorkload, device: str, env: Dict[str, Any], reps: int,
            budget_s: float) -> Dict[str, Any]:
    import torch

    row = common.base_row(env, BENCH, wl.name, variant)
    row.update(shape=wl.shape_text(), dtype="float32")
    why = missing_piece(variant)
    if why:
        row.update(status="skipped", note=why)
        return row
    vae = build_vae(wl.arch, device)
    loss_mod = build_loss(variant, vae, wl)
    lat = wl.resolution // 8
    gen = torch.Generator(device=device).manual_seed(1)
    target = torch.randn(wl.batch, 4, lat, lat, generator=gen, device=device)
    pred = (target + 0.3 * torch.randn(target.shape, generator=gen, device=device)).requires_grad_(True)

    def drop() -> None:
        pred.grad = None

    def step() -> None:
        loss_mod.get_loss(pred, target).mean().backward()

    mem = common.PeakMemory(device)
    timing = common.time_call(step, device, reps=reps, min_reps=3, budget_s=budget_s, between=drop,
                              on_measure_start=lambda: (drop(), mem.start()))
    extra = mem.stop()
    row["values_per_side"] = wl.feature_bytes() // 8 if wl.feature_bytes() else ""
    common.fill_measurement(row, timing, extra, wl.feature_bytes(), 0, None)
    row["floor_bytes"] = ""  # compute bound: no bandwidth floor
    if mem.approximate:
        row["note"] = "peak RSS approximate (ru_maxrss)"
    del loss_mod, vae, pred, target
    gc.collect()
    return row


def worker(args: argparse.Namespace) -> int:
    env = common.env_info(args.device)

    def measure_one(variant: str, wl: Any) -> Dict[str, Any]:
        return measure(variant, wl, args.device, env, args.reps, args.budget)

    return common.worker_rows(BENCH, workloads(args.mode, args.device), args.workloads.split(","), args.variant,
                              env, measure_one)


def run(mode: str, device: str, variants: Sequence[str], env: Dict[str, Any], reps: int = 5,
        budget_s: float = 20.0, log: Callable[[str], None] = print,
        inprocess: bool = False, name_filter: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every variant over the mode's grid (names matching ``name_filter``, a regular
    expression), one fresh worker process per variant."""
    args = ["--mode", mode, "--device", device, "--reps", str(reps), "--budget", str(budget_s)]

    def measure_one(variant: str, wl: Any) -> Dict[str, Any]:
        return measure(variant, wl, device, env, reps, budget_s)

    return common.run_grid(BENCH, "benchmarks.bench_decoder", workloads(mode, device), name_filter, variants, env, args,
                           inprocess, measure_one, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=20.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workloads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "full")
    env = common.env_info(args.device)
    rows = run(mode, args.device, common.parse_list(args.variants, VARIANTS, "variants"), env, args.reps,
               args.budget)
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
