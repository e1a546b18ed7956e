"""Peak host memory of ``get_loss`` + backward on an SDXL-sized VAE decoder (CPU).

Each variant runs in a fresh subprocess (so ``ru_maxrss`` is that variant's own peak):
the real SDXL VAE config (block_out_channels (128, 256, 512, 512), 4 latent channels,
random weights, frozen), batch 1, 512x512 pixels -> 64x64 latents, all four up blocks.

Variants (same options: norm shared, pow_law, remove_outliers, grad_ckpt):
    reference  tests/reference_lpl.py::ReferenceLPL (restatement of the public reference)
    lpl_ext    lpl_ext.LatentPerceptualLoss (default, fixed mode; per-module checkpoints)
    lpl_ext_block  the same with checkpoint_granularity="block" (the reference's granularity)
    compat     lpl_ext.LatentPerceptualLoss(reference_compat=True)
and, with --no-ckpt, the same three without gradient checkpointing.

Reported per variant: ru_maxrss before the call (VAE built, inputs allocated), the peak
after get_loss + backward, and their difference (the loss's own peak). Usage:

    python benchmarks/bench_vae_memory.py [--res 512] [--no-ckpt] [--variants reference,lpl_ext]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("reference", "lpl_ext", "lpl_ext_block", "compat")

SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", sample_size=1024, scaling_factor=0.13025,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant(variant: str, res: int, grad_ckpt: bool) -> dict:
    """Runs one variant in this process and returns its figures."""
    import torch
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(ROOT / "tests"))
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval().requires_grad_(False)
    opts = dict(loss_type="mse", grad_ckpt=grad_ckpt, pow_law=True, norm_type="shared", num_mid_blocks=4,
                remove_outliers=True)
    if variant == "reference":
        from reference_lpl import ReferenceLPL

        loss_fn = ReferenceLPL(vae, **opts)
    else:
        from lpl_ext import LatentPerceptualLoss

        loss_fn = LatentPerceptualLoss(vae, reference_compat=(variant == "compat"),
                                       checkpoint_granularity="block" if variant == "lpl_ext_block" else "module",
                                       **opts)
    h = res // 8
    g = torch.Generator().manual_seed(1)
    target = torch.randn(1, 4, h, h, generator=g)
    pred = (target + 0.3 * torch.randn(1, 4, h, h, generator=g)).requires_grad_(True)
    before = _maxrss_mib()
    t0 = time.perf_counter()
    loss = loss_fn.get_loss(pred, target)
    t1 = time.perf_counter()
    loss.sum().backward()
    t2 = time.perf_counter()
    peak = _maxrss_mib()
    return {"variant": variant, "res": res, "grad_ckpt": grad_ckpt, "loss": float(loss.sum()),
            "grad_abs_sum": float(pred.grad.abs().sum()), "rss_before_mib": round(before, 1),
            "rss_peak_mib": round(peak, 1), "loss_peak_mib": round(peak - before, 1),
            "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=512, help="image resolution (latents are res/8)")
    parser.add_argument("--no-ckpt", action="store_true", help="also run every variant without checkpointing")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.res, bool(args.ckpt))))
        return
    results = []
    settings = [True, False] if args.no_ckpt else [True]
    for ckpt in settings:
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", variant, "--res", str(args.res), "--ckpt", str(int(ckpt))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ),
                                 cwd=str(ROOT))
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{variant:10s} ckpt={int(ckpt)} res={args.res}: peak RSS {row['rss_peak_mib']:8.1f} MiB "
                  f"(before call {row['rss_before_mib']:7.1f}, loss+backward {row['loss_peak_mib']:8.1f}) "
                  f"fwd {row['forward_s']:6.1f}s bwd {row['backward_s']:6.1f}s loss {row['loss']:.6g}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
