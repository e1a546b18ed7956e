"""LoRA fine-tuning with LPL in train_sdxl_lpl.py (``--rank``), on the tiny offline pipeline.

In-process: the adapters are the only trainable parameters and sit exactly on the attention projections;
text-encoder adapters get gradients through the prompt embeddings. One ``accelerate launch`` run plus its
resume: only adapters change, the saved ``pytorch_lora_weights.safetensors`` loads into a fresh pipeline
with ``load_lora_weights`` and changes its output, validation images are generated with the adapters,
and a resumed run ends bit-identical to the uninterrupted one.

``python tests/test_lora.py --measure [--sdxl]`` measures peak memory and time per step of LoRA + LPL
against a full fine-tune + LPL (see ``measure``); docs/training.md quotes its output.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_sdxl_lpl as tr  # noqa: E402
from lpl_ext.demo import tiny_sdxl as ts  # noqa: E402
from test_train_sdxl_lpl import FAST, accelerate_configs, launch, read_metrics, tiny_cache  # noqa: E402,F401

RANK = 4


def _tiny_models(tiny_cache):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = ts.ensure_tiny_sdxl(tiny_cache)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    return path, unet, te1, te2


def expected_lora_params(model: torch.nn.Module, targets, rank: int) -> int:
    """Parameters of rank-``rank`` adapters (A: r x in, B: out x r) on every Linear named by ``targets``."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def test_adapters_are_the_only_trainable_parameters(tiny_cache):
    _, unet, te1, te2 = _tiny_models(tiny_cache)
    expected = {id(m): expected_lora_params(m, tr.UNET_LORA_TARGETS if m is unet else tr.TEXT_ENCODER_LORA_TARGETS,
                                            RANK) for m in (unet, te1, te2)}
    base_total = sum(p.numel() for m in (unet, te1, te2) for p in m.parameters())
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1)),
                added_cond_kwargs={"text_embeds": torch.zeros(1, 32),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        before = unet(sample, 10, **cond).sample

    params = tr.add_lora_adapters(unet, [te1, te2], rank=RANK, alpha=RANK)

    for model in (unet, te1, te2):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable), [n for n in trainable if "lora_" not in n]
        assert sum(p.numel() for p in trainable.values()) == expected[id(model)] > 0
        # Every attention projection got an adapter; nothing else did.
        adapted = {n.rsplit(".lora_", 1)[0] for n in trainable}
        targets = tr.UNET_LORA_TARGETS if model is unet else tr.TEXT_ENCODER_LORA_TARGETS
        assert all(any(a.endswith("." + t) for t in targets) for a in adapted)
    assert sum(p.numel() for p in params) == sum(expected.values())
    assert sum(p.numel() for p in params) < 0.2 * base_total
    # B starts at zero: the adapted UNet computes exactly what the base UNet did.
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, **cond).sample, before)


def test_text_encoder_adapters_get_gradients_through_the_prompt_embeddings(tiny_cache):
    _, unet, te1, te2 = _tiny_models(tiny_cache)
    tr.add_lora_adapters(unet, [te1, te2], rank=RANK, alpha=RANK)
    for p in (p for m in (unet, te1, te2) for n, p in m.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.02)  # B = 0 would make A's gradient 0
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(0))
    embeds, pooled = tr.encode_prompts((te1, te2), [ids, ids], train=True)
    assert embeds.requires_grad and pooled.requires_grad
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=embeds,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}).sample
    out.square().mean().backward()
    for model in (te1, te2, unet):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert sum(int(g is not None and g.abs().sum() > 0) for g in grads) > len(grads) // 2
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    # Without train=True the embeddings carry no graph (frozen text encoders cost no activation memory).
    frozen, _ = tr.encode_prompts((te1, te2), [ids, ids])
    assert not frozen.requires_grad


def test_lora_flag_errors(capsys):
    for argv, message in [
        (["--rank", "0"], "--rank must be >= 1"),
        (["--lora_alpha", "8"], "--lora_alpha needs --rank"),
        (["--train_text_encoder"], "--train_text_encoder trains LoRA adapters on the text encoders and needs --rank"),
        (["--rank", "4", "--use_ema"], "--use_ema is not supported with --rank"),
        (["--rank", "4", "--lora_alpha", "-1"], "--lora_alpha must be a positive number"),
    ]:
        with pytest.raises(SystemExit) as exc:
            tr.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    args = tr.parse_args(["--rank", "8"])
    assert args.lora_alpha == 8.0 and not args.train_text_encoder


def _latent_output(pipe, prompt: str = "a large red circle on a white background") -> torch.Tensor:
    return pipe(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_lora_run_trains_only_adapters_saves_loadable_weights_and_resumes(tmp_path, tiny_cache, accelerate_configs):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from PIL import Image
    from safetensors.torch import load_file

    base_path = ts.ensure_tiny_sdxl(tiny_cache)
    out = tmp_path / "lora"
    common = [*FAST, "--rank", str(RANK), "--train_text_encoder", "--lpl_t_threshold", "1000",
              "--learning_rate", "1e-2", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3",
              "--max_train_steps", "4"]
    proc = launch(accelerate_configs, tiny_cache, [*common, "--output_dir", str(out)])

    # Only the adapters were trained: the count the run reports is the adapter count.
    _, unet, te1, te2 = _tiny_models(tiny_cache)
    expected = (expected_lora_params(unet, tr.UNET_LORA_TARGETS, RANK)
                + expected_lora_params(te1, tr.TEXT_ENCODER_LORA_TARGETS, RANK)
                + expected_lora_params(te2, tr.TEXT_ENCODER_LORA_TARGETS, RANK))
    assert re.search(rf"trainable parameters: {expected} \(LoRA adapters\)", proc.stderr)
    rows = read_metrics(out)
    assert [float(r["lpl_applied_ratio"]) for r in rows] == [1.0] * 4  # LPL on every step
    assert all(float(r["lpl_loss"]) > 0 for r in rows)

    weights = load_file(str(out / tr.LORA_WEIGHT_NAME))
    assert weights and all("lora" in k for k in weights)
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    assert sum(v.numel() for v in weights.values()) == expected
    assert not (out / "unet").exists()  # no full UNet copy: the base weights did not change
    for step in (2, 4):  # checkpoints hold the adapters in the diffusers format, not a model.safetensors
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / tr.LORA_WEIGHT_NAME).is_file() and not list(ckpt.glob("model*.safetensors"))
    final_ckpt = load_file(str(out / "checkpoint-4" / tr.LORA_WEIGHT_NAME))
    assert final_ckpt.keys() == weights.keys() and all(torch.equal(final_ckpt[k], weights[k]) for k in weights)

    # The weights load into a fresh pipeline with load_lora_weights and change what it generates.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base_path))
    pipe.set_progress_bar_config(disable=True)
    args = tr.parse_args(FAST)
    schedule = dict(DDPMScheduler.from_pretrained(str(base_path), subfolder="scheduler").config)

    def validation_images() -> list[np.ndarray]:
        components = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                          tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
        images = tr.generate_validation_images(components, pipe.unet, args.validation_prompts, 1, 64, 2,
                                               "epsilon", schedule, args.seed, "cpu")
        return [np.asarray(imgs[0], dtype=np.int16) for _, imgs in images]

    saved = [np.asarray(Image.open(out / "validation" / f"step000004_prompt{i}_0.png"), dtype=np.int16)
             for i in range(len(args.validation_prompts))]
    before, base_images = _latent_output(pipe), validation_images()
    pipe.load_lora_weights(str(out))
    after, lora_images = _latent_output(pipe), validation_images()
    assert (after - before).abs().max() > 1e-3, "the LoRA weights do not change the output"
    # The run's final validation images were generated with the adapters applied: the fresh pipeline with the
    # saved weights reproduces them (up to one 8-bit level of PNG rounding), the base pipeline does not.
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(lora_images, saved))
    assert any(np.abs(a - b).max() > 1 for a, b in zip(base_images, saved))

    # Resume from checkpoint-2 in a fresh folder: the end state equals the uninterrupted run's, bit for bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    proc = launch(accelerate_configs, tiny_cache, [*common, "--output_dir", str(resumed),
                                                   "--num_validation_images", "0", "--resume_from_checkpoint",
                                                   "latest"])
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    again = load_file(str(resumed / tr.LORA_WEIGHT_NAME))
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in rows[2:]]


# ----------------------------------------------------------------------------------------------------
# Measurement (not a test): python tests/test_lora.py --measure [--sdxl]
# ----------------------------------------------------------------------------------------------------

# The public SDXL base configs (stabilityai/stable-diffusion-xl-base-1.0 unet/ and vae/ config.json).
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", sample_size=1024, scaling_factor=0.13025,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024.0


def _measure_one(model: str, mode: str, resolution: int, batch: int, steps: int, base_dtype: str) -> dict:
    """One configuration in this process: build, then ``steps`` training steps with LPL applied to every
    sample (t_threshold 1000, the worst case). Returns peak RSS and the median step time after the first."""
    import resource
    import time

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[base_dtype]
    if model == "tiny":
        path = ts.ensure_tiny_sdxl()
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        text_dim, pooled_dim = unet.config.cross_attention_dim, 32
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built directly in the base dtype: no transient fp32 copy
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        torch.set_default_dtype(previous)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_dim, pooled_dim = 2048, 1280
    vae.requires_grad_(False)
    unet.to(dtype)
    if mode == "lora":
        params = tr.add_lora_adapters(unet, rank=RANK, alpha=RANK)
        for p in params:
            p.data = p.data.float()
    else:
        params = list(unet.parameters())
    if model == "sdxl":
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    args = tr.parse_args(["--lpl_t_threshold", "1000"])
    objective = tr.build_lpl_objective(args, vae)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alphas = sched.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    lat = resolution // 8
    setup_rss = _rss_mib()
    times = []
    for step in range(steps):
        latents = torch.randn(batch, 4, lat, lat, generator=g)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, metrics = tr.compute_losses(
                unet=unet, batch_latents=latents, noise=torch.randn(latents.shape, generator=g),
                prompt_embeds=torch.randn(batch, 77, text_dim, generator=g),
                pooled_embeds=torch.randn(batch, pooled_dim, generator=g),
                add_time_ids=torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                          dtype=torch.float32),
                noise_scheduler=sched, prediction_type="epsilon", args=args, lpl_objective=objective,
                global_step=step, alphas_cumprod=alphas, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        assert float(metrics["lpl_applied_ratio"]) == 1.0
    return {"model": model, "mode": mode, "resolution": resolution, "batch": batch, "base_dtype": base_dtype,
            "trainable_params": sum(p.numel() for p in params), "unet_params": sum(p.numel() for p in unet.parameters()),
            "setup_rss_mib": round(setup_rss), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            # min as well as median: on a shared machine the fastest step is the least disturbed one
            "step_s_median": round(float(np.median(times[1:] if len(times) > 1 else times)), 3),
            "step_s_min": round(float(min(times[1:] if len(times) > 1 else times)), 3), "steps": steps}


def measure(sdxl: bool) -> list[dict]:
    """Each configuration in a fresh process (peak RSS is per process); prints one JSON line per run."""
    import subprocess

    configs = [("tiny", "full", 64, 4, 12, "fp32"), ("tiny", "lora", 64, 4, 12, "fp32")]
    if sdxl:
        # Full fine-tune of the 2.6B UNet needs ~41 GB for weights, gradients and Adam alone: not on this
        # machine, so only LoRA is measured at SDXL size (base weights in bf16, as --mixed_precision bf16).
        configs.append(("sdxl", "lora", 256, 1, 3, "bf16"))
    results = []
    for cfg in configs:
        code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_lora; "
                f"print('RESULT', json.dumps(test_lora._measure_one(*{cfg!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{cfg}: {proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure(sdxl="--sdxl" in sys.argv)
