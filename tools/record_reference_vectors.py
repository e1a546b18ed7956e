"""Record the public reference LatentPerceptualLoss end to end through a VAE decoder.

Writes ``tests/data/lpl_decoder_path.npz``: the outputs of the public reference class
(diffusers ``examples/research_projects/lpl/lpl_loss.py``, run unmodified) on a tiny
AutoencoderKL whose decoder features carry blob artifacts (``tests/reference_lpl.py::
blob_vae``), so that its outlier removal really removes pixels on layers 2, 3 and 4.
``tests/test_module_parity.py`` checks ``LatentPerceptualLoss(..., reference_compat=True)``
against it: an anchor outside the repository for the whole decoder path, including the
reference's quirks that a single-layer vector cannot show (``post_quant_conv`` skipped,
``z / scale + shift`` fed to ``decoder.conv_in``, the mid-block output cast to the up
blocks' dtype).

The reference file is not part of this repository: pass its path. It is run once and its
outputs are stored; the tests never need it.

    python tools/record_reference_vectors.py --reference /path/to/diffusers/examples/research_projects/lpl/lpl_loss.py

What is stored (``np.savez_compressed``; float32 weights are exact, the VAE is built in
float32 and cast):
    ``config``                      JSON: the AutoencoderKL kwargs (scale and shift factors
                                    rounded to float32, see ``blob_vae``)
    ``w/<name>``                    float32 decoder and post_quant_conv weights
    ``runs``                        JSON list of runs: name, reference options, dtype setup
    ``<run>/input``, ``<run>/target``   latents in diffusion space (N, 4, 8, 8)
    ``<run>/grad_output``           (N,) weights of the per-sample losses in the backward
    ``<run>/loss<i>``               per-layer per-sample loss (N,) (``get_hist=True``)
    ``<run>/keep<i>``               the keep-mask the reference applied (layers 2-4 only)
    ``<run>/grad<i>``               d(sum(loss_i * grad_output))/d input
    ``<run>/stats``                 (layers, 3): mean, std, outlier_ratio the reference logged

Runs: three option sets on a float64 VAE (the tight anchor), and one on the dtype layout of
diffusers' ``upcast_vae`` (conv_in and mid block in a lower precision than the up blocks;
here float32 and float64), where the reference's cast after the mid block is what makes
the up blocks run at all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference_lpl import TINY_VAE_CONFIGS, blob_vae  # noqa: E402

OUT = ROOT / "tests" / "data" / "lpl_decoder_path.npz"
VAE_NAME = "sdxl_like"
LATENT_SEED = 8  # target latents whose blobs trigger the outlier removal on layers 2-4 (>= 1% of every sample)

RUNS: List[Dict[str, Any]] = [
    dict(name="f64_shared_mse", dtype="float64",
         options=dict(loss_type="mse", grad_ckpt=True, pow_law=True, norm_type="shared", num_mid_blocks=4,
                      remove_outliers=True)),
    dict(name="f64_default_l1", dtype="float64",
         options=dict(loss_type="l1", grad_ckpt=False, pow_law=False, norm_type="default", num_mid_blocks=4,
                      remove_outliers=True)),
    dict(name="f64_batch_mse", dtype="float64",
         options=dict(loss_type="mse", grad_ckpt=True, pow_law=True, norm_type="batch", num_mid_blocks=4,
                      remove_outliers=True)),
    dict(name="upcast_shared_mse", dtype="upcast",
         options=dict(loss_type="mse", grad_ckpt=True, pow_law=True, norm_type="shared", num_mid_blocks=4,
                      remove_outliers=True)),
]


def vae_kwargs() -> Dict[str, Any]:
    """The AutoencoderKL kwargs of ``blob_vae(VAE_NAME)``, factors as it rounds them."""
    cfg = dict(layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_VAE_CONFIGS[VAE_NAME].items()})
    cfg["scaling_factor"] = float(np.float32(cfg["scaling_factor"]))
    if cfg.get("shift_factor") is not None:
        cfg["shift_factor"] = float(np.float32(cfg["shift_factor"]))
    return cfg


def stored_weight_names(vae: torch.nn.Module) -> List[str]:
    """The parameters the decoder path up to the last up block uses."""
    keep = ("post_quant_conv.", "decoder.conv_in.", "decoder.mid_block.", "decoder.up_blocks.")
    return [k for k in vae.state_dict() if k.startswith(keep)]


def build_vae(config: Dict[str, Any], weights: Dict[str, np.ndarray], dtype: str) -> torch.nn.Module:
    """AutoencoderKL from ``config`` with the stored weights, float64, or the upcast layout
    (``dtype="upcast"``: decoder.conv_in and decoder.mid_block in float32)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # the unstored encoder and output layers: any values, unused
    vae = AutoencoderKL(**config).eval()
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    missing = set(stored_weight_names(vae)) - set(state)
    if missing:
        raise ValueError(f"weights: missing {sorted(missing)[:3]}...")
    vae.load_state_dict(state, strict=False)
    torch.nn.Module.to(vae, torch.float64)
    if dtype == "upcast":
        vae.decoder.conv_in.float()
        vae.decoder.mid_block.float()
    elif dtype != "float64":
        raise ValueError(f"dtype: expected 'float64' or 'upcast', got {dtype!r}")
    vae.requires_grad_(False)
    return vae


def run_latents(vae: torch.nn.Module, dtype: str) -> Dict[str, torch.Tensor]:
    """Target latents from LATENT_SEED, the prediction = target + 0.5 noise, and the
    backward weights; float32 latents for the upcast layout (its conv_in is float32)."""
    g = torch.Generator().manual_seed(LATENT_SEED)
    c = vae.config.latent_channels
    target = torch.randn(2, c, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, c, 8, 8, generator=g, dtype=torch.float64)
    inp = target + 0.5 * noise
    if dtype == "upcast":
        target, inp = target.float(), inp.float()
    return dict(input=inp, target=target, grad_output=torch.tensor([0.75, -1.25], dtype=torch.float64))


def load_reference(path: Path):
    spec = importlib.util.spec_from_file_location("public_reference_lpl_loss", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("LatentPerceptualLoss", "remove_outliers"):
        if not hasattr(module, name):
            raise SystemExit(f"--reference: {path} has no {name}: not the reference lpl_loss.py")
    return module


def record_run(ref_module, vae: torch.nn.Module, run: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """One run of the reference: per-layer losses, masks, stats and latent gradients."""
    latents = run_latents(vae, run["dtype"])
    masks: List[torch.Tensor] = []
    original = ref_module.remove_outliers

    def recording_remove_outliers(feat, *args, **kwargs):
        mask, out = original(feat, *args, **kwargs)
        masks.append(mask.detach().clone())
        return mask, out

    ref_module.remove_outliers = recording_remove_outliers
    try:
        lpl = ref_module.LatentPerceptualLoss(vae, **run["options"])
        x = latents["input"].clone().requires_grad_(True)
        hist = lpl.get_loss(x, latents["target"], get_hist=True)
    finally:
        ref_module.remove_outliers = original
    out: Dict[str, np.ndarray] = {}
    prefix = run["name"] + "/"
    out[prefix + "input"] = latents["input"].numpy()
    out[prefix + "target"] = latents["target"].numpy()
    out[prefix + "grad_output"] = latents["grad_output"].numpy()
    go = latents["grad_output"]
    for i, loss in enumerate(hist):
        out[prefix + f"loss{i}"] = loss.detach().double().numpy()
        (g,) = torch.autograd.grad((loss * go.to(loss.dtype)).sum(), x, retain_graph=i + 1 < len(hist))
        out[prefix + f"grad{i}"] = g.numpy()
    if len(masks) != 3:
        raise RuntimeError(f"expected the reference to mask layers 2, 3 and 4, it masked {len(masks)} layers")
    for i, mask in zip((2, 3, 4), masks):
        out[prefix + f"keep{i}"] = mask.numpy()
    out[prefix + "stats"] = np.array([[s["mean"], s["std"], s["outlier_ratio"]] for s in lpl.last_feature_stats])
    ratios = out[prefix + "stats"][2:, 2]
    print(f"{run['name']}: losses " + " ".join(f"{float(out[prefix + f'loss{i}'].mean()):.6g}" for i in range(5))
          + "; outlier ratios of layers 2-4 " + " ".join(f"{r:.4f}" for r in ratios))
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="path of the public reference lpl_loss.py (diffusers examples/research_projects/lpl)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reductions in one fixed order
    ref_module = load_reference(args.reference)

    source = blob_vae(VAE_NAME, dtype=torch.float32)
    names = stored_weight_names(source)
    weights = {k: source.state_dict()[k].numpy() for k in names}
    config = vae_kwargs()
    arrays: Dict[str, np.ndarray] = {"config": np.array(json.dumps(config)),
                                     "runs": np.array(json.dumps(RUNS))}
    arrays.update({"w/" + k: v for k, v in weights.items()})
    for run in RUNS:
        vae = build_vae(config, weights, run["dtype"])
        if run["dtype"] == "float64":
            # the stored weights rebuild the very VAE blob_vae gives
            want = blob_vae(VAE_NAME)
            for k in names:
                assert torch.equal(vae.state_dict()[k], want.state_dict()[k]), k
        arrays.update(record_run(ref_module, vae, run))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
