"""Pretrain the tiny SDXL-architecture VAE of ``lpl_ext.demo.tiny_sdxl`` on the built-in synthetic shapes.

Writes ``lpl_ext/demo/assets/tiny_vae.safetensors`` (fp32 state dict, ~1.3 MB) whose metadata holds the
``scaling_factor`` (1 / std of the training latents, as Stable Diffusion sets it) and the training
settings. ``lpl_ext.demo.tiny_sdxl`` loads it into the tiny VAE when it exists, so the demo trainer's
validation images are decodable pictures and the LPL decoder features mean something.

Data: images drawn by ``lpl_ext.demo.synthetic_data.draw_example`` (index -> shape, colour, background, size,
position) at random canvas sizes (so shape scale and position vary beyond the 256 base combinations),
then random 64x64 crops, horizontal/vertical flips and transposes. Loss: mean L1 reconstruction error of the
decoded posterior sample + ``kl_weight`` * KL (summed over latent elements, batch-averaged); Adam, warmup
and cosine decay, gradient clipping at 1.

Reproducible: everything is seeded and the step count is fixed (not time-based); run with the same
torch version and thread count (``--threads``, default 2) for bit-identical weights.

Run time (defaults: 2000 steps of batch 16; torch 2.13 CPU, 2 threads): 412 s on an idle 2-core VM
(0.21 s/step). The shipped weights come from that run: PSNR 26.7 dB on 64 trainer-view crops (shapes,
colours and backgrounds right, slightly soft edges), latent std 1.554 -> scaling_factor 0.64350. (The
first shipped file, 300 steps, reached 15.8 dB with some foreground colours wrong.) When the shipped
file changes, bump ``TINY_SDXL_VERSION`` in lpl_ext/demo/tiny_sdxl.py.

    python tools/pretrain_tiny_vae.py                      # writes lpl_ext/demo/assets/tiny_vae.safetensors
    python tools/pretrain_tiny_vae.py --steps 100 --out /tmp/v.safetensors --grid /tmp/grid.png

Texture VAE (``lpl_ext/demo/assets/tiny_vae_textures.safetensors``, the VAE of the ``dataset="textures"`` tiny
pipeline): the same architecture fine-tuned from the shipped shapes VAE (``--init``) on the textures of
``lpl_ext.demo.textures`` (``--data textures``: trainer-view crops with flips and transposes, which map the set
onto itself up to the caption; ``--data shapes+textures`` mixes in half shapes), on 32x32 sub-crops
(``--crop 32``, a quarter of the cost per step). Its record (``tiny_vae_textures.json``: the commands of its
four stages, settings, wall times, reconstruction PSNR and spectrum band errors per pattern and per
period) is written next to it; a run with ``--init`` carries the init file's record forward (its note, its
stages, and its own run as the last stage). Stages 1-3 (textures only, ~1600 steps on a heavily shared 2-core VM) reached
14.8 dB on texture crops and dropped period 4 from the set (never reconstructed); stage 4, the shipped file,
is 6000 steps on shapes+textures (0.14 s/step idle, 14 min): 18.25 dB on texture crops, 78.8% of
reconstructions with period, orientation and colours read back right (period 6: 65%, 8: 77%, 12: 90%), and
25.65 dB on the shapes (the shapes VAE: 26.7 dB; the shapes pipeline keeps ``tiny_vae.safetensors``).

    python tools/pretrain_tiny_vae.py --data textures --init lpl_ext/demo/assets/tiny_vae.safetensors \
        --steps 400 --lr 2e-3 --crop 32 --pool 3000 --out STAGE1   # then --init STAGE1 ... (see the .json)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpl_ext.demo import synthetic_data as sd  # noqa: E402
from lpl_ext.demo import texture_metrics as tm  # noqa: E402
from lpl_ext.demo import textures as tx  # noqa: E402
from lpl_ext.demo import tiny_sdxl as ts  # noqa: E402

RESOLUTION = 64


def render_pool(num_images: int, seed: int) -> torch.Tensor:
    """``num_images`` synthetic pictures, uint8 (N, 3, 64, 64), at random canvas sizes and crops.

    A third are drawn exactly as the trainer sees them (80x64 canvas, random 64x64 crop); the rest on
    canvases from 64 to 128 px per side, so shapes appear at more scales and positions.
    """
    rng = random.Random(seed)
    out = np.empty((num_images, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for n in range(num_images):
        index = rng.randrange(1 << 20)
        if n % 3 == 0:
            width, height = sd.DEFAULT_WIDTH, sd.DEFAULT_HEIGHT
        else:
            width, height = rng.randint(RESOLUTION, 2 * RESOLUTION), rng.randint(RESOLUTION, 2 * RESOLUTION)
        img, _ = sd.draw_example(index, width, height)
        left, top = rng.randint(0, width - RESOLUTION), rng.randint(0, height - RESOLUTION)
        out[n] = np.asarray(img.crop((left, top, left + RESOLUTION, top + RESOLUTION)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def render_texture_pool(num_images: int, seed: int) -> torch.Tensor:
    """``num_images`` texture crops, uint8 (N, 3, 64, 64), as the trainer sees them (80x64 canvas of a random
    example index, random 64x64 crop)."""
    rng = random.Random(seed)
    out = np.empty((num_images, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for n in range(num_images):
        img, _ = tx.draw_example(rng.randrange(tx.num_distinct_examples() * 16))
        left = rng.randint(0, tx.DEFAULT_WIDTH - RESOLUTION)
        out[n] = np.asarray(img.crop((left, 0, left + RESOLUTION, RESOLUTION)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def texture_eval_images(per_group: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Trainer-view texture crops, float32 [-1, 1], ``per_group`` per (pattern, orientation) slot, and their
    captions (the indices of a slot are slot + 10 k, so every period and many colours appear)."""
    rng = random.Random(seed)
    imgs, captions = [], []
    for slot in range(len(tx.SLOTS)):
        for _ in range(per_group):
            index = slot + len(tx.SLOTS) * rng.randrange(tx.num_distinct_examples())
            img, caption = tx.draw_example(index)
            left = rng.randint(0, tx.DEFAULT_WIDTH - RESOLUTION)
            arr = np.asarray(img.crop((left, 0, left + RESOLUTION, RESOLUTION)), dtype=np.float32)
            imgs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            captions.append(caption)
    return torch.stack(imgs) / 127.5 - 1.0, captions


def _to_pil(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def texture_report(vae, per_group: int = 8, seed: int = 4321) -> dict:
    """Reconstruction quality on the textures: PSNR (dB) and :func:`texture_metrics.band_spectrum_errors`
    of the reconstructions (posterior mean) against the originals, per pattern, per period and overall;
    also the share of reconstructions whose period, orientation and colours
    :func:`texture_metrics.score_image` reads back right (``all_ok``, %)."""
    x, captions = texture_eval_images(per_group, seed)
    recon = torch.cat([vae(x[i:i + 32], sample_posterior=False).sample for i in range(0, len(x), 32)])
    mse = ((recon.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    psnr_each = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).tolist()
    rec_pil = [_to_pil(r) for r in recon]
    ref_pil = [_to_pil(o) for o in x]
    scores = tm.score_images(rec_pil, captions)
    specs = [tx.parse_caption(c) for c in captions]

    def group(sel: list[int]) -> dict:
        bands = tm.band_spectrum_errors([rec_pil[i] for i in sel], [ref_pil[i] for i in sel])
        summary = tm.summarize([scores[i] for i in sel])
        return {"n": len(sel), "psnr_db": round(float(np.mean([psnr_each[i] for i in sel])), 2),
                **{f"band_error_{k}": round(v, 3) for k, v in bands.items()},
                "all_ok": round(summary["all_ok"], 1), "edge_width_px": round(summary["edge_width_px"], 3)}

    everything = list(range(len(x)))
    return {
        "images": len(x),
        "overall": group(everything),
        "per_pattern": {p: group([i for i in everything if specs[i]["pattern"] == p]) for p in tx.PATTERNS},
        "per_period": {str(t): group([i for i in everything if specs[i]["period_px"] == t]) for t in tx.PERIODS},
        "reference_edge_width_px": round(tm.summarize(tm.score_images(ref_pil, captions))["edge_width_px"], 3),
    }


def augment(batch_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random h/v flips and 90-degree rotations; uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    x = batch_u8.float() / 127.5 - 1.0
    flips = torch.rand(x.shape[0], 3, generator=gen)
    x = torch.where((flips[:, 0] < 0.5)[:, None, None, None], x.flip(3), x)
    x = torch.where((flips[:, 1] < 0.5)[:, None, None, None], x.flip(2), x)
    x = torch.where((flips[:, 2] < 0.5)[:, None, None, None], x.transpose(2, 3), x)
    return x


def trainer_view_images(num_images: int, seed: int) -> torch.Tensor:
    """Images exactly as the demo trainer crops them (80x64 canvas, random 64x64 crop), float32 [-1, 1]."""
    rng = random.Random(seed)
    imgs = []
    for _ in range(num_images):
        img, _ = sd.draw_example(rng.randrange(sd.num_distinct_examples() * 4))
        left = rng.randint(0, sd.DEFAULT_WIDTH - RESOLUTION)
        arr = np.asarray(img.crop((left, 0, left + RESOLUTION, RESOLUTION)), dtype=np.float32)
        imgs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(imgs) / 127.5 - 1.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1], (N, 3, H, W)."""
    mse = ((x.clamp(-1, 1) - y) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: str) -> None:
    """PNG grid: row pairs of originals (top) and reconstructions (bottom), upscaled x2."""
    from PIL import Image

    n = originals.shape[0]
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    canvas = torch.full((3, rows * 2 * (RESOLUTION + 2), cols * (RESOLUTION + 2)), 0.5)
    for i in range(n):
        r, c = divmod(i, cols)
        for k, img in enumerate((originals[i], recons[i])):
            y0 = (2 * r + k) * (RESOLUTION + 2)
            x0 = c * (RESOLUTION + 2)
            canvas[:, y0:y0 + RESOLUTION, x0:x0 + RESOLUTION] = (img.clamp(-1, 1) + 1) / 2
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


# Flags added with the texture VAE; left out of the shapes run's recorded settings at their defaults.
NEW_FLAGS = ("data", "init", "crop", "eval_every")


def carried_history(init: "str | None") -> dict:
    """The stage history of the ``--init`` file's record (its sibling ``.json``, when there is
    one): its ``note``, its earlier ``stages``, and its own run as the last of them, so that a
    chain of fine-tuning stages keeps every command and result in the final record."""
    if init is None or not Path(init).with_suffix(".json").is_file():
        return {}
    prev = json.loads(Path(init).with_suffix(".json").read_text())
    textures = prev.get("textures") or {}
    stage = {"command": prev.get("command"), "train_s": prev.get("train_s"), "wall_s": prev.get("wall_s"),
             "s_per_step": prev.get("s_per_step"), "textures_overall": textures.get("overall"),
             "textures_per_period": textures.get("per_period"), "shapes_psnr_db": textures.get("shapes_psnr_db")}
    out = {"stages": [*prev.get("stages", []), stage]}
    if "note" in prev:
        out["note"] = prev["note"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--pool", type=int, default=6000, help="Number of distinct pre-rendered training crops.")
    p.add_argument("--init_logvar", type=float, default=-6.0, help="Initial posterior log-variance bias.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=str, default=str(ROOT / "lpl_ext" / "demo" / "assets" / ts.TINY_VAE_ASSET_NAME))
    p.add_argument("--grid", type=str, default=None, help="Optional PNG of originals vs reconstructions.")
    p.add_argument("--data", choices=("shapes", "textures", "shapes+textures"), default="shapes",
                   help="Training images: the shapes (default, the shipped tiny_vae.safetensors), the textures, or "
                        "half of each (the shipped tiny_vae_textures.safetensors).")
    p.add_argument("--crop", type=int, default=RESOLUTION,
                   help="Train on random CROPxCROP sub-crops of the 64x64 pool (a multiple of 8; the VAE is "
                        "convolutional and the textures periodic, so 32 costs 1/4 per step and still shows several "
                        "periods). Evaluation is always at 64x64.")
    p.add_argument("--eval_every", type=int, default=25, help="Print the validation PSNR every N steps.")
    p.add_argument("--init", type=str, default=None,
                   help="Start from these VAE weights (e.g. the shipped shapes VAE) instead of the random init.")
    args = p.parse_args()
    if args.crop % 8 or not 8 <= args.crop <= RESOLUTION:
        p.error(f"--crop must be a multiple of 8 in [8, {RESOLUTION}], got {args.crop}")
    import shlex

    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.data == "shapes":
        pool = render_pool(args.pool, args.seed)
    elif args.data == "textures":
        pool = render_texture_pool(args.pool, args.seed)
    else:  # interleaved halves, so a random batch holds both
        shapes, textures = render_pool(args.pool - args.pool // 2, args.seed), render_texture_pool(args.pool // 2, args.seed)
        pool = torch.cat([shapes, textures])
    print(f"rendered {len(pool)} crops in {time.time() - t0:.1f}s", flush=True)

    if args.init is not None:
        vae = ts.build_tiny_vae(seed=1, pretrained=True, weights=args.init)
    else:
        # Same architecture and init as the random VAE of build_tiny_sdxl_components(seed=0).
        vae = ts.build_tiny_vae(seed=1, pretrained=False)
        # Start with posterior std ~0.05 instead of ~1: with a random encoder the latent means are small, so
        # unit-variance posterior samples would drown the signal and the first few hundred steps (all that
        # fits on a CPU) would go into shrinking the variance instead of learning to reconstruct.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels:] = args.init_logvar
    vae.to(memory_format=torch.channels_last)  # ~10% faster CPU convolutions
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    warmup = max(1, args.steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_x = trainer_view_images(64, seed=args.seed + 12345)
    if args.data != "shapes":  # validate on both halves of what it learns
        tex_x, _ = texture_eval_images(4, seed=args.seed + 12345)
        eval_x = torch.cat([eval_x[:32], tex_x[:32]]) if args.data == "shapes+textures" else tex_x[:64]
    t_train = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(pool), (args.batch_size,), generator=gen)
        batch = pool[idx]
        if args.crop != RESOLUTION:
            top, left = (int(v) for v in torch.randint(0, RESOLUTION - args.crop + 1, (2,), generator=gen))
            batch = batch[:, :, top:top + args.crop, left:left + args.crop]
        x = augment(batch, gen).contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec_loss = (recon - x).abs().mean()
        kl = posterior.kl().mean()  # KL summed over the latent elements, averaged over the batch
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                vae.eval()
                val_x = eval_x[:16] if args.data == "shapes" else eval_x[::4]  # both halves of the mix
                val = psnr(vae(val_x).sample, val_x)
                vae.train()
            elapsed = time.time() - t_train
            print(f"step {step:5d} l1 {rec_loss.item():.4f} kl {kl.item():.1f} val_psnr {val:.2f} dB "
                  f"lr {sched.get_last_lr()[0]:.2e} {elapsed:.0f}s", flush=True)
    train_s = time.time() - t_train

    vae.eval()
    with torch.no_grad():
        # SD convention: scaling_factor = 1 / std of the (sampled) latents of the training images.
        latent_x = trainer_view_images(256, seed=args.seed + 999)
        if args.data != "shapes":  # the latents the texture base will be trained on
            tex = texture_eval_images(26, seed=args.seed + 999)[0][:256]
            latent_x = torch.cat([latent_x[:128], tex[:128]]) if args.data == "shapes+textures" else tex
        z = torch.cat([vae.encode(latent_x[i:i + 32]).latent_dist.sample(generator=gen)
                       for i in range(0, len(latent_x), 32)])
        scaling_factor = float(1.0 / z.flatten().std())
        recon = vae(eval_x, sample_posterior=False).sample
        final_psnr = psnr(recon, eval_x)
    print(f"latent mean {float(z.mean()):.4f} std {float(z.std()):.4f} -> scaling_factor {scaling_factor:.5f}")
    report = None
    if args.data != "shapes":
        report = texture_report(vae)
        shapes_psnr = psnr(torch.cat([vae(trainer_view_images(64, seed=args.seed + 12345)[i:i + 32],
                                          sample_posterior=False).sample for i in (0, 32)]),
                           trainer_view_images(64, seed=args.seed + 12345))
        report["shapes_psnr_db"] = round(shapes_psnr, 2)
        print(json.dumps(report, indent=1))
    print(f"final PSNR on 64 trainer-view images {final_psnr:.2f} dB; training {train_s:.0f}s "
          f"({train_s / args.steps:.3f}s/step), total {time.time() - t0:.0f}s")
    if args.grid:  # the first 8 and the last 8 (the textures, with --data shapes+textures)
        pick = (torch.arange(16) if args.data == "shapes" else
                torch.cat([torch.arange(8), torch.arange(len(eval_x) - 8, len(eval_x))]))
        save_grid(eval_x[pick], recon[pick], args.grid)
        print(f"wrote {args.grid}")

    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "scaling_factor": repr(scaling_factor),
        "psnr_db": f"{final_psnr:.3f}",
        # The shapes run's settings as before the texture flags existed (so its shipped file is reproduced).
        "settings": json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "grid")
                                and not (k in NEW_FLAGS and args.data == "shapes" and args.init is None
                                         and getattr(args, k) == p.get_default(k))}),
        "torch": torch.__version__,
    }
    vae.to(memory_format=torch.contiguous_format)
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(out), metadata=metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if report is not None:
        record = {"command": command, "settings": json.loads(metadata["settings"]), "torch": torch.__version__,
                  "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
                  "s_per_step": round(train_s / args.steps, 4), "scaling_factor": scaling_factor,
                  "psnr_db_eval_mix": round(final_psnr, 2), "textures": report}
        record = {**carried_history(args.init), **record}
        out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
