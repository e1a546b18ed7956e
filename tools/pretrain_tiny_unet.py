"""Pretrain the tiny SDXL-architecture UNet of ``lpl_ext.demo.tiny_sdxl`` into a base that draws the built-in prompts.

Writes ``lpl_ext/demo/assets/tiny_sdxl_base.safetensors``: the UNet (EMA weights) and the two frozen CLIP text
encoders it was trained against (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``; fp32), with the
training settings, wall time and torch version in the safetensors metadata, and a JSON record next to it
(``tiny_sdxl_base.json``: command, seed, steps, wall time, loss, evaluation). ``lpl_ext.demo.tiny_sdxl`` loads it
when it exists, so the offline demo of ``train_sdxl_lpl.py`` fine-tunes from a model that already draws its
validation prompts instead of from noise.

Data: the captioned shapes of ``lpl_ext.demo.synthetic_data`` (every shape, colour, background and size; positions
vary with the example index), rendered the two ways the model is conditioned at run time: as the trainer
sees them (80x64 canvas, random 64x64 crop; SDXL time ids ``(64, 80, 0, left, 64, 64)``) and on a 64x64
canvas (time ids ``(64, 64, 0, 0, 64, 64)``, what the pipeline passes at sampling). Images are encoded once
with the shipped tiny VAE (posterior mean and std kept; a fresh posterior sample every step, as the
trainer does), captions once with the frozen text encoders (SDXL: penultimate hidden states of both
encoders, pooled projection of the second).

Objective: epsilon prediction on SDXL's scaled-linear DDPM schedule (1000 steps, uniform timesteps), Min-SNR
weighting (gamma 5), and 10% of the captions replaced by all-zero embeddings: that is the unconditional
input ``StableDiffusionXLPipeline`` uses for classifier-free guidance (``force_zeros_for_empty_prompt``), so
guided sampling works. AdamW with warmup and cosine decay, gradient clipping at 1, EMA of the weights
(the shipped weights are the EMA).

Reproducible: everything is seeded and the step count is fixed; run with the same torch version and thread
count for bit-identical weights. When the shipped file changes, bump ``TINY_SDXL_VERSION`` in
lpl_ext/demo/tiny_sdxl.py.

The shipped file: the defaults below (3500 steps of batch 64, seed 0, 1 thread; torch 2.13 CPU), 1291 s wall
(1208 s training, 0.345 s/step) on a 2-core VM shared with other jobs; final Min-SNR loss 0.0174 (0.55 at
step 100). Sampled as the trainer validates (16 prompts x 4 images, Euler 10 steps, guidance 5), 95.3% of
the images have the caption's foreground colour, background colour and shape (100% colours and sizes; the
misses are small white crosses drawn too round), shape IoU 0.906, edge width 1.54 px (the dataset's own
drawings through the VAE: 96.9%, 0.928, 1.85 px). Command, seed, wall time, loss history and this
evaluation are in ``tiny_sdxl_base.json``.

    python tools/pretrain_tiny_unet.py                           # writes lpl_ext/demo/assets/tiny_sdxl_base.*
    python tools/pretrain_tiny_unet.py --steps 200 --out /tmp/base.safetensors
    python tools/pretrain_tiny_unet.py --evaluate_only            # re-measure the shipped file

Texture base (``--data textures``; ``lpl_ext/demo/assets/tiny_sdxl_textures_base.safetensors``, the base of the
``dataset="textures"`` tiny pipeline): the same recipe on the textures of ``lpl_ext.demo.textures`` (trainer
view 80x64 with random crops, and 64x64 canvases), encoded with the texture VAE and the texture tokenizer's
text encoders, evaluated with ``lpl_ext.demo.texture_metrics.evaluate`` on ``textures.evaluation_prompts()``.
Its command, settings, wall time and evaluation are in ``tiny_sdxl_textures_base.json``. The shipped file:
3000 steps of batch 32 on the stage-4 texture VAE (646 s wall on the idle 2-core VM, 0.19 s/step; final loss
0.028); sampled as the trainer validates (16 prompts x 4, Euler 10 steps, guidance 5) 81% of the images have
the caption's period, 80% its orientation, 30% both colours, 23% all three. A base to fine-tune, weakest on
colours.

    python tools/pretrain_tiny_unet.py --data textures --steps 3000 --batch_size 32 --warmup 100 --pool 6000 \
        --checkpoint_every 500
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpl_ext.demo import synthetic_data as sd  # noqa: E402
from lpl_ext.demo import textures as tx  # noqa: E402
from lpl_ext.demo import tiny_sdxl as ts  # noqa: E402

RESOLUTION = 64


def render_pool(num_images: int, seed: int, data: str = "shapes") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``num_images`` training crops: uint8 pixels (N, 3, 64, 64), SDXL time ids float32 (N, 6), captions.

    Even entries are drawn as the trainer sees the built-in set (80x64 canvas, random horizontal crop), odd
    ones on a 64x64 canvas, the size the pipeline's sampling conditions on.
    """
    source = tx if data == "textures" else sd  # same draw_example / DEFAULT_* / num_distinct_examples API
    rng = random.Random(seed)
    pixels = np.empty((num_images, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    time_ids = np.empty((num_images, 6), dtype=np.float32)
    captions = []
    for n in range(num_images):
        index = rng.randrange(source.num_distinct_examples() * 64)
        if n % 2 == 0:
            img, caption = source.draw_example(index)
            left = rng.randint(0, source.DEFAULT_WIDTH - RESOLUTION)
            img = img.crop((left, 0, left + RESOLUTION, RESOLUTION))
            time_ids[n] = (source.DEFAULT_HEIGHT, source.DEFAULT_WIDTH, 0, left, RESOLUTION, RESOLUTION)
        else:
            img, caption = source.draw_example(index, RESOLUTION, RESOLUTION)
            time_ids[n] = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)
        pixels[n] = np.asarray(img)
        captions.append(caption)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(time_ids), captions


@torch.no_grad()
def encode_pool(vae, pixels_u8: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, both already multiplied by the VAE's scaling factor."""
    means, stds = [], []
    for i in range(0, len(pixels_u8), batch):
        x = pixels_u8[i:i + batch].float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        means.append(dist.mean * vae.config.scaling_factor)
        stds.append(dist.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(components: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings (K, 77, 64) and pooled embeddings (K, 32) of ``captions``, as the trainer and
    ``StableDiffusionXLPipeline.encode_prompt`` compute them."""
    embeds, pooled = [], None
    for tok, enc in ((components["tokenizer"], components["text_encoder"]),
                     (components["tokenizer_2"], components["text_encoder_2"])):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    """EMA with the usual warmup ``min(max_decay, (1 + step) / (10 + step))``."""
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def save_base(path: Path, components: dict, unet: torch.nn.Module, metadata: dict) -> None:
    """Write the UNet and both text encoders (fp32) with ``metadata`` (str -> str) to ``path``."""
    from safetensors.torch import save_file

    state = {}
    for prefix, module in (("unet", unet), ("text_encoder", components["text_encoder"]),
                           ("text_encoder_2", components["text_encoder_2"])):
        for k, v in module.state_dict().items():
            state[f"{prefix}.{k}"] = v.detach().float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def evaluate(weights: Path, num_images: int, seed: int, data: str = "shapes",
             vae_weights: str | None = None) -> dict:
    """Sample the validation-style prompt set with the tiny pipeline built on ``weights`` (10 Euler steps,
    guidance 5, as the trainer's validation) and score the images with ``lpl_ext.demo.image_metrics``
    (textures: ``lpl_ext.demo.texture_metrics.evaluate`` on ``textures.evaluation_prompts()``)."""
    from diffusers import StableDiffusionXLPipeline

    from lpl_ext.demo import image_metrics as im

    comps = ts.build_tiny_sdxl_components(seed=0, base_weights=weights, dataset=data, vae_weights=vae_weights)
    pipe = StableDiffusionXLPipeline(**comps)
    if data == "textures":
        from lpl_ext.demo import texture_metrics as tm

        prompts = tx.evaluation_prompts()
        images, used = im.generate(pipe, prompts, num_images, seed)
        summary = tm.evaluate(images, used, seed=seed)
    else:
        prompts = im.evaluation_prompts()
        images, used = im.generate(pipe, prompts, num_images, seed)
        summary = im.summarize(im.score_images(images, used))
    return {"prompts": len(prompts), "images_per_prompt": num_images,
            "sampler": "Euler, 10 steps, guidance 5", "seed": seed, **summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--uncond_prob", type=float, default=0.1, help="Fraction of captions replaced by zeros.")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--pool", type=int, default=12000, help="Number of distinct pre-rendered training crops.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="Torch threads (1 is faster than 2 on a 2-core machine shared with other jobs).")
    p.add_argument("--checkpoint_every", type=int, default=500,
                   help="Also write the EMA weights every N steps (to OUT.partial) for inspection.")
    p.add_argument("--data", choices=("shapes", "textures"), default="shapes",
                   help="Training set (shapes: the shipped tiny_sdxl_base; textures: tiny_sdxl_textures_base).")
    p.add_argument("--vae", type=str, default=None,
                   help="VAE weights to encode with (default: the shipped VAE of --data).")
    p.add_argument("--out", type=str, default=None, help="Default: the shipped base file of --data.")
    p.add_argument("--eval_images", type=int, default=4, help="Images per evaluation prompt (0: skip).")
    p.add_argument("--evaluate_only", action="store_true", help="Only evaluate OUT and update its JSON.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = str(ts.tiny_base_weights_path(args.data))
    out = Path(args.out)
    record_path = out.with_suffix(".json")

    if args.evaluate_only:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        t0 = time.time()
        record["evaluation"] = evaluate(out, args.eval_images, seed=1000, data=args.data, vae_weights=args.vae)
        print(json.dumps(record["evaluation"], indent=1))
        print(f"evaluated in {time.time() - t0:.0f}s")
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        return

    from diffusers import DDPMScheduler

    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    torch.manual_seed(args.seed)
    t0 = time.time()
    # Same UNet and text encoders as build_tiny_sdxl_components(seed=0, pretrained_base=False); the VAE
    # is the shipped pretrained one.
    comps = ts.build_tiny_sdxl_components(seed=0, pretrained_base=False, dataset=args.data, vae_weights=args.vae)
    vae = comps["vae"].eval()
    pixels, time_ids, captions = render_pool(args.pool, args.seed, args.data)
    mean, std = encode_pool(vae, pixels)
    unique = sorted(set(captions))
    caption_index = torch.tensor([unique.index(c) for c in captions])
    cap_embeds, cap_pooled = encode_captions(comps, unique)
    del pixels
    print(f"pool: {len(mean)} crops, {len(unique)} captions, latent std {float(mean.std()):.3f}; "
          f"prepared in {time.time() - t0:.0f}s", flush=True)

    unet = comps["unet"]
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = DDPMScheduler.from_config(comps["scheduler"].config)
    alphas_cumprod = sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    def lr_factor(s: int) -> float:  # linear warmup, cosine decay to 0 at the last step
        return min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t_train = time.time()
    running, history = 0.0, []
    for step in range(args.steps):
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        keep = (torch.rand(args.batch_size, generator=gen) >= args.uncond_prob).float()
        emb = cap_embeds[caption_index[idx]] * keep[:, None, None]
        pooled = cap_pooled[caption_index[idx]] * keep[:, None]
        pred = unet(zt, t, encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids[idx]}).sample
        weight = snr[t].clamp(max=args.snr_gamma) / snr[t]  # Min-SNR for epsilon prediction
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema_update(ema, unet, step, args.ema_decay)
        running += float(loss.detach())
        if (step + 1) % 100 == 0 or step == args.steps - 1:
            n = (step % 100) + 1
            history.append({"step": step + 1, "loss": round(running / n, 5)})
            print(f"step {step + 1:6d} loss {running / n:.4f} lr {lr_sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
            running = 0.0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_base(out.with_suffix(".partial.safetensors"), comps, ema, {"step": str(step + 1)})
    train_s = time.time() - t_train
    wall_s = time.time() - t0

    # The shapes run's settings as before --data / --vae existed (so its shipped record is reproduced).
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "evaluate_only", "eval_images")
                and not (k in ("data", "vae") and args.data == "shapes" and args.vae is None)}
    record = {
        "command": command,
        "seed": args.seed,
        "settings": settings,
        "torch": torch.__version__,
        "threads": args.threads,
        "train_s": round(train_s, 1),
        "wall_s": round(wall_s, 1),
        "s_per_step": round(train_s / args.steps, 4),
        "final_loss": history[-1]["loss"],
        "loss_history": history,
    }
    metadata = {"settings": json.dumps(settings), "torch": torch.__version__, "wall_s": f"{wall_s:.1f}",
                "command": command}
    save_base(out, comps, ema, metadata)
    partial = out.with_suffix(".partial.safetensors")
    if partial.exists():
        partial.unlink()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); training {train_s:.0f}s "
          f"({train_s / args.steps:.3f}s/step), total {wall_s:.0f}s", flush=True)
    if args.eval_images:
        record["evaluation"] = evaluate(out, args.eval_images, seed=1000, data=args.data, vae_weights=args.vae)
        print(json.dumps(record["evaluation"], indent=1))
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {record_path}")


if __name__ == "__main__":
    main()
