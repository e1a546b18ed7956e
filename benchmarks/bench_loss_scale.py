"""Loss scale of lpl_ext's default LatentPerceptualLoss against the public reference at the
same flags, so that an ``lpl_weight`` tuned on the reference can be carried over.

The reference's arithmetic is ``LatentPerceptualLoss(..., reference_compat=True)`` (equal
to the reference to ~1e-7; checked here against tests/reference_lpl.py when it is
importable). The difference at the recommended flags (mse, shared norm, pow_law, 4 up
blocks, outliers) is ``post_quant_conv``, which the reference skips and lpl_ext applies.

For pairs (z0_hat, z0) with z0_hat = z0 + sigma * noise (sigma = the z0-space error of a
prediction; small below the usual t_threshold), prints the mean per-sample loss of both,
their ratio ``lpl_ext / reference``, and the ratio of the gradient norms
``||dL/dz0_hat||`` (what the optimizer sees).

VAEs: the SDXL VAE architecture with random weights (default; nothing is downloaded),
lpl_ext's tiny pretrained VAE on latents of its synthetic shapes (``--tiny``), or any
local diffusers AutoencoderKL folder (``--vae PATH``, e.g. a downloaded SDXL VAE; the
latents are then random normal in diffusion space unless ``--tiny``).

    python -m benchmarks.bench_loss_scale [--res 128] [--batch 4] [--tiny] [--vae PATH]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

FLAGS: Dict[str, Any] = dict(loss_type="mse", norm_type="shared", pow_law=True, num_mid_blocks=4,
                             remove_outliers=True, grad_ckpt=False)
SIGMAS = (0.05, 0.1, 0.3)


def load_vae(args: argparse.Namespace) -> Any:
    import torch

    if args.vae:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(args.vae, local_files_only=True).eval().float()
    if args.tiny:
        from lpl_ext.tiny_sdxl import build_tiny_vae

        return build_tiny_vae(pretrained=True).eval()
    from benchmarks.bench_decoder import build_vae

    return build_vae("sdxl", "cpu", seed=args.seed)


def clean_latents(vae: Any, args: argparse.Namespace) -> Any:
    """Diffusion-space z0 (batch, C, res/8, res/8)."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(args.seed)
    lat = args.res // 8
    if not args.tiny:
        return torch.randn(args.batch, vae.config.latent_channels, lat, lat, generator=g)
    from lpl_ext.synthetic_data import draw_example

    images = [np.asarray(draw_example(i, width=args.res, height=args.res)[0].convert("RGB"), dtype=np.float32)
              for i in range(args.batch)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def reference_class() -> Optional[Any]:
    tests_dir = str(common.REPO / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    try:
        from reference_lpl import ReferenceLPL  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    return ReferenceLPL


def measure(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import torch

    from lpl_ext import LatentPerceptualLoss

    vae = load_vae(args).requires_grad_(False)
    z0 = clean_latents(vae, args)
    fixed = LatentPerceptualLoss(vae, **FLAGS)
    compat = LatentPerceptualLoss(vae, reference_compat=True, **FLAGS)
    ref_cls = reference_class()
    ref = ref_cls(vae, **FLAGS) if ref_cls is not None else None
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for sigma in SIGMAS:
        z_hat = (z0 + sigma * torch.randn(z0.shape, generator=g)).requires_grad_(True)
        out: Dict[str, Any] = {"sigma": sigma}
        for name, mod in (("lpl_ext", fixed), ("reference", compat)):
            loss = mod.get_loss(z_hat, z0)
            (grad,) = torch.autograd.grad(loss.mean(), z_hat)
            out[f"{name}_loss"] = float(loss.detach().mean())
            out[f"{name}_grad"] = float(grad.norm())
        if ref is not None:
            out["restatement_loss"] = float(ref.get_loss(z_hat.detach(), z0).mean())
        out["loss_ratio"] = out["lpl_ext_loss"] / out["reference_loss"]
        out["grad_ratio"] = out["lpl_ext_grad"] / out["reference_grad"]
        rows.append(out)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=128, help="pixel resolution (latents res/8)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="lpl_ext's tiny pretrained VAE on its synthetic shapes")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder")
    args = p.parse_args(argv)
    if args.res % 8 or args.res < 32:
        p.error(f"--res: expected a multiple of 8 >= 32, got {args.res}")
    which = args.vae or ("tiny pretrained VAE, synthetic shapes" if args.tiny else "SDXL VAE config, random weights")
    rows = measure(args)
    print(f"{which}; {args.batch}x{args.res}px; flags {FLAGS}")
    print("| sigma | reference loss | lpl_ext loss | loss ratio | grad-norm ratio |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        check = ""
        if "restatement_loss" in r:
            check = f" (restatement {r['restatement_loss']:.6g})"
        print(f"| {r['sigma']} | {r['reference_loss']:.6g}{check} | {r['lpl_ext_loss']:.6g} | "
              f"{r['loss_ratio']:.3f} | {r['grad_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
