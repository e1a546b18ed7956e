"""Tests of train_sdxl_lpl.py.

In-process tests cover argument handling, checkpoint atomicity, data conditioning and the loss
arithmetic; subprocess tests run ``accelerate launch --config_file <generated> train_sdxl_lpl.py`` on
the tiny offline pipeline at 64px, in the style of the diffusers example tests.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_sdxl_lpl as tr  # noqa: E402
from lpl_ext.demo import synthetic_data as sd  # noqa: E402
from lpl_ext.demo import tiny_sdxl as ts  # noqa: E402

SCRIPT = str(ROOT / "train_sdxl_lpl.py")
FAST = ["--resolution", "64", "--train_batch_size", "2", "--num_synthetic_examples", "8",
        "--num_validation_images", "1", "--num_validation_inference_steps", "2"]


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """Shared with tests/test_tiny_sdxl.py: the tiny pipeline is built once per session."""
    root = tmp_path_factory.getbasetemp() / "lpl_tiny_cache"
    ts.ensure_tiny_sdxl(root)
    return root


def free_port() -> int:
    """A TCP port that is free now (the OS picks it), for a torchrun rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def accelerate_configs(tmp_path_factory):
    """A generated one-process accelerate config (several processes start from the command line, see ``launch``)."""
    from accelerate.utils import write_basic_config

    single = tmp_path_factory.mktemp("accelerate_cfg") / "single.json"
    write_basic_config(mixed_precision="no", save_location=str(single))
    return {"single": single}


def _env(tiny_cache):
    env = dict(os.environ)
    env.update({ts.CACHE_ENV_VAR: str(tiny_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def launch(configs, tiny_cache, args, *, processes=1, timeout=300, check=True, env=None):
    """``accelerate launch`` the trainer: one process from the generated config, or ``processes`` with the
    docs/training.md's command line (``--multi_gpu --num_processes N``, no config file; gloo processes on CPU)."""
    launcher = ["--config_file", str(configs["single"])]
    env = {**_env(tiny_cache), **(env or {})}
    if processes > 1:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
        env["HF_HOME"] = str(Path(tiny_cache) / "hf_home")  # no default accelerate config file
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, SCRIPT, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    with open(out / tr.METRICS_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def checkpoint_names(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name.startswith(tr.CHECKPOINT_PREFIX)}


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def test_defaults_are_the_seed_recommendations():
    args = tr.parse_args([])
    assert args.use_lpl is True and args.lpl_weight == 1.0 and args.lpl_t_threshold == 200
    assert args.lpl_loss_type == "mse" and args.lpl_norm_type == "shared"
    assert args.lpl_pow_law and args.lpl_num_blocks == 4 and args.lpl_remove_outliers and args.lpl_start == 0
    assert args.lpl_scale is False
    # Decoder checkpointing has its own switch, on by default, independent of the UNet's flag.
    assert args.lpl_grad_ckpt is True and args.gradient_checkpointing is False
    assert args.offline_demo and args.builtin_data and args.resolution == tr.DEMO_DEFAULTS["resolution"]
    assert args.validation_prompts  # the demo writes validation images
    # As in the reference, --snr_gamma alone does not switch the LPL SNR weighting on (at t = 0 it would
    # scale epsilon LPL by ~0.004); --lpl_scale does.
    assert tr.parse_args(["--snr_gamma", "5"]).lpl_scale is False
    assert tr.parse_args(["--snr_gamma", "5", "--lpl_scale"]).lpl_scale is True


def test_negations_and_real_model_defaults():
    args = tr.parse_args(["--no_use_lpl", "--no_lpl_pow_law", "--no_lpl_remove_outliers", "--no_lpl_grad_ckpt",
                          "--snr_gamma", "5", "--no_lpl_scale",
                          "--pretrained_model_name_or_path", "some/model"])
    assert not (args.use_lpl or args.lpl_pow_law or args.lpl_remove_outliers or args.lpl_grad_ckpt or args.lpl_scale)
    assert not args.offline_demo and args.resolution == 1024 and args.max_train_steps is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lpl_norm_type", "layer"], "invalid choice: 'layer'"),
        (["--lpl_loss_type", "huber"], "invalid choice: 'huber'"),
        (["--lpl_num_blocks", "7"], "--lpl_num_blocks must be between 0 and 4"),
        (["--lpl_num_blocks", "-1"], "--lpl_num_blocks must be between 0 and 4"),
        (["--train_data_dir", "/nonexistent/folder"], "does not exist"),
        (["--lpl_scale"], "needs --snr_gamma"),
        (["--prediction_type", "flow_matching", "--snr_gamma", "5"], "flow_matching"),
        (["--prediction_type", "x0"], "invalid choice: 'x0'"),
        (["--resolution", "60"], "multiple of 8"),
        (["--lpl_weight", "-1"], "--lpl_weight must be >= 0"),
        (["--lpl_start", "-2"], "--lpl_start must be >= 0"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "not a complete checkpoint"),
    ],
)
def test_bad_arguments_exit_with_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tr.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_data_folder_without_metadata_is_rejected(tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(b"")
    with pytest.raises(SystemExit):
        tr.parse_args(["--train_data_dir", str(tmp_path)])
    assert "metadata.jsonl" in capsys.readouterr().err


def test_objective_gets_the_lpl_flags(monkeypatch):
    import lpl_ext

    seen = {}

    class Recorder:
        def __init__(self, vae, **kwargs):
            seen.update(kwargs, vae=vae)

    monkeypatch.setattr(lpl_ext, "LPLObjective", Recorder, raising=False)
    args = tr.parse_args(["--lpl_loss_type", "l1", "--lpl_norm_type", "batch", "--no_lpl_pow_law",
                          "--lpl_num_blocks", "2", "--no_lpl_remove_outliers", "--lpl_t_threshold", "300",
                          "--snr_gamma", "5", "--lpl_scale", "--lpl_start", "7"])
    tr.build_lpl_objective(args, "VAE")
    # One configuration end to end: every option under its LPLConfig name, the rest at its defaults.
    assert seen == dict(vae="VAE", config=lpl_ext.LPLConfig(
        loss_type="l1", norm_type="batch", pow_law=False, num_blocks=2, remove_outliers=False, grad_ckpt=True,
        t_threshold=300, snr_gamma=5.0, scale=True, start_step=7, decoder_fp32=True, reference_compat=False,
        sync_free=False, capacity=None))
    # --gradient_checkpointing (UNet) does not switch decoder checkpointing, --no_lpl_grad_ckpt does.
    tr.build_lpl_objective(tr.parse_args(["--gradient_checkpointing"]), "VAE")
    assert seen["config"].grad_ckpt is True
    tr.build_lpl_objective(tr.parse_args(["--no_lpl_grad_ckpt"]), "VAE")
    assert seen["config"].grad_ckpt is False


def test_readme_main_command_parses():
    """docs/training.md: first command is `accelerate launch train_sdxl_lpl.py`, has no comment after a line
    continuation (the reference README's bug) and every shown command's flags parse (all pages:
    tests/test_docs.py)."""
    text = (ROOT / "docs" / "training.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks
    first = blocks[0].strip().splitlines()
    assert first[0].startswith("accelerate launch train_sdxl_lpl.py")
    for block in blocks:
        for line in block.splitlines():
            assert not re.search(r"\\\s*#", line), f"comment after a line continuation: {line!r}"
            assert not line.rstrip().endswith("\\ "), line
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if "train_sdxl_lpl.py" not in words:
                continue
            argv = words[words.index("train_sdxl_lpl.py") + 1:]
            unknown = tr.build_parser().parse_known_args(argv)[1]  # exits on a bad flag value
            assert not unknown, f"unknown flags in docs: {unknown}"


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


class FakeAccelerator:
    """Stands in for accelerate.Accelerator in save_checkpoint: writes a weights file per save."""

    is_main_process = True
    num_processes = 1

    def __init__(self, fail_on_step=None):
        self.fail_on_step = fail_on_step
        self.step = 0

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder, "model.safetensors").write_text("weights")
        if self.fail_on_step == self.step:
            raise KeyboardInterrupt("killed during save")


def test_checkpoint_save_is_atomic_and_pruned(tmp_path):
    acc = FakeAccelerator()
    for step in (2, 4, 6):
        acc.step = step
        tr.save_checkpoint(acc, tmp_path, step, total_limit=2)
    assert checkpoint_names(tmp_path) == {"checkpoint-4", "checkpoint-6"}
    assert json.loads((tmp_path / "checkpoint-6" / tr.CHECKPOINT_STATE_FILE).read_text())["global_step"] == 6
    # A save interrupted midway leaves no checkpoint-8 and does not prune the complete ones.
    acc = FakeAccelerator(fail_on_step=8)
    acc.step = 8
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint(acc, tmp_path, 8, total_limit=2)
    assert checkpoint_names(tmp_path) == {"checkpoint-4", "checkpoint-6"}
    assert tr.resolve_checkpoint_path(tmp_path, "latest") == tmp_path / "checkpoint-6"
    # The next save clears the stale temporary folder.
    acc = FakeAccelerator()
    tr.save_checkpoint(acc, tmp_path, 8, total_limit=2)
    assert checkpoint_names(tmp_path) == {"checkpoint-6", "checkpoint-8"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    for step in (3, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / tr.CHECKPOINT_STATE_FILE).write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-20").mkdir()  # e.g. written by a tool that is not atomic: no state file
    (tmp_path / ".tmp-checkpoint-30").mkdir()
    (tmp_path / "checkpoint-abc").mkdir()
    assert [s for s, _ in tr.list_checkpoints(tmp_path)] == [3, 10]
    assert tr.resolve_checkpoint_path(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert tr.resolve_checkpoint_path(tmp_path, "checkpoint-3") == tmp_path / "checkpoint-3"
    assert tr.resolve_checkpoint_path(tmp_path, "checkpoint-20") is None
    assert tr.resolve_checkpoint_path(tmp_path / "empty", "latest") is None


# ----------------------------------------------------------------------------------------------------
# Data conditioning
# ----------------------------------------------------------------------------------------------------


def _to_pixels(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


@pytest.mark.parametrize("center_crop", [True, False])
@pytest.mark.parametrize("flip", [True, False])
def test_crop_coordinates_describe_the_returned_pixels(center_crop, flip):
    from PIL import Image

    img, _ = sd.draw_example(7, width=96, height=64)
    rng = random.Random(3)
    for _ in range(6):
        pixels, original, (top, left) = tr.preprocess_image(img, 48, center_crop, flip, rng)
        assert original == (64, 96)
        resized = img.resize((72, 48), Image.BILINEAR)
        direct = _to_pixels(resized.crop((left, top, left + 48, top + 48)))
        flipped = _to_pixels(resized.transpose(Image.FLIP_LEFT_RIGHT).crop((left, top, left + 48, top + 48)))
        # The crop at (top, left) of the (possibly flipped) resized image is exactly what is returned.
        assert torch.equal(pixels, direct) or (flip and torch.equal(pixels, flipped))
        if center_crop and not flip:
            assert (top, left) == (0, 12)


class PoolingVAE:
    """Deterministic stand-in VAE: latents = 8x average pooling of the pixels (first 4 channels padded)."""

    device = torch.device("cpu")
    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        z = torch.cat([pooled, pooled[:, :1]], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: z))


def test_cached_latents_keep_their_crop_coordinates():
    """Reference bug: cached latents paired with re-drawn crop coordinates. Here every cached item carries
    the conditioning of the pixels it was encoded from, and the collated time ids use it."""
    from PIL import Image

    random.seed(11)
    source = [sd.draw_example(i, width=96, height=64) for i in range(6)]

    class Source(list):
        pass

    ds = tr.TrainDataset(Source(source), 32, center_crop=False, random_flip=True)
    cached = tr.build_cached_latents(ds, PoolingVAE(), batch_size=4)
    crops = set()
    for (img, caption), item in zip(source, cached.items):
        top, left = item["crop_top_left"]
        crops.add((top, left))
        resized = img.resize((48, 32), Image.BILINEAR)
        candidates = [resized.crop((left, top, left + 32, top + 32)),
                      resized.transpose(Image.FLIP_LEFT_RIGHT).crop((left, top, left + 32, top + 32))]
        expected = [PoolingVAE().encode(_to_pixels(c)[None]).latent_dist.sample()[0] for c in candidates]
        assert any(torch.allclose(item["latents"], e) for e in expected)
        assert item["original_size"] == (64, 96) and item["caption"] == caption
    assert len(crops) > 1  # random crops really differ between items

    class Tokenizer:
        model_max_length = 5

        def __call__(self, captions, **kw):
            return SimpleNamespace(input_ids=torch.zeros(len(captions), 5, dtype=torch.long))

    batch = tr.make_collate((Tokenizer(), Tokenizer()), 32)([cached[0], cached[1]])
    for row, item in zip(batch["add_time_ids"], cached.items[:2]):
        assert row.tolist() == [*item["original_size"], *item["crop_top_left"], 32, 32]
    assert torch.equal(batch["latents"][0], cached.items[0]["latents"])


# ----------------------------------------------------------------------------------------------------
# Loss arithmetic
# ----------------------------------------------------------------------------------------------------


def test_step_metrics_reset_every_step():
    """Reference bug: train_loss accumulated forever. Each pop is the mean of that step's micro-batches. A
    name outside the list raises (a value nobody would log must not vanish) and adds nothing."""
    m = tr.StepMetrics(["loss", "lpl_loss"])
    m.add({"loss": torch.tensor(2.0), "lpl_loss": torch.tensor(1.0)})
    m.add({"loss": torch.tensor(4.0)})
    assert m.pop() == {"loss": 3.0, "lpl_loss": 1.0}
    with pytest.raises(ValueError, match=r"unknown metric name\(s\) \['other'\]"):
        m.add({"loss": torch.tensor(10.0), "other": torch.tensor(5.0)})
    m.add({"loss": torch.tensor(10.0)})
    out = m.pop()
    assert out["loss"] == 10.0 and out["lpl_loss"] != out["lpl_loss"]  # NaN: not seen this step
    # Weighted values: a micro-batch with weight 0 (LPL not applied) does not dilute the mean.
    m.add({"lpl_loss": torch.tensor(0.0)}, {"lpl_loss": torch.tensor(0.0)})
    m.add({"lpl_loss": torch.tensor(6.0)}, {"lpl_loss": torch.tensor(1.0)})
    assert m.pop()["lpl_loss"] == 6.0


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012)


@pytest.mark.parametrize("prediction_type", tr.PREDICTION_TYPES)
def test_noisy_latents_and_targets_are_fp32_and_exact(prediction_type):
    sched = _scheduler()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(5, 4, 8, 8, generator=g)
    eps = torch.randn(5, 4, 8, 8, generator=g)
    out = tr.sample_noisy_latents(z0, eps, prediction_type, sched, torch.Generator().manual_seed(1))
    assert out["noisy_latents"].dtype == torch.float32 and out["target"].dtype == torch.float32
    z0d, epsd = z0.double(), eps.double()
    if prediction_type == "flow_matching":
        s = out["sigmas"].double().view(-1, 1, 1, 1)
        assert torch.allclose(out["timesteps"], out["sigmas"] * 1000)
        zt = (1 - s) * z0d + s * epsd
        target = epsd - z0d
    else:
        assert out["sigmas"] is None and out["timesteps"].dtype == torch.long
        a = sched.alphas_cumprod.double()[out["timesteps"]].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0d + (1 - a).sqrt() * epsd
        v = a.sqrt() * epsd - (1 - a).sqrt() * z0d
        target = {"epsilon": epsd, "sample": z0d, "v_prediction": v}[prediction_type]
    assert torch.allclose(out["noisy_latents"].double(), zt, atol=1e-5)
    assert torch.allclose(out["target"].double(), target, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_diffusion_loss(prediction_type):
    sched = _scheduler()
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    got = tr.diffusion_loss(pred, target, prediction_type, 5.0, sched.alphas_cumprod, t)
    a = sched.alphas_cumprod.double()[t]
    snr = a / (1 - a)
    w = torch.minimum(snr, torch.full_like(snr, 5.0))
    w = {"epsilon": w / snr, "v_prediction": w / (snr + 1), "sample": w}[prediction_type]
    per = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(got.double(), (w * per).mean(), rtol=1e-5)
    plain = tr.diffusion_loss(pred, target, prediction_type)
    assert torch.allclose(plain.double(), per.mean(), rtol=1e-5)


def test_lpl_runs_decoder_in_fp32_under_low_precision_unet(tiny_cache):
    """Reference bugs: the fp32 VAE ran in fp16 under accelerator.autocast(), and z0_hat came from z_t cast to
    the training dtype. The UNet here runs under bf16 autocast (as accelerate does); the objective must get
    fp32 z_t and latents, and the decoder must see fp32 inputs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = ts.ensure_tiny_sdxl(tiny_cache)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    args = tr.parse_args(["--lpl_t_threshold", "1000"])  # every sample qualifies
    objective = tr.build_lpl_objective(args, vae)
    calls, decoder_dtypes = [], []

    def recording_objective(model_pred, noisy_latents, latents, timesteps, **kw):
        calls.append((model_pred.dtype, noisy_latents.dtype, latents.dtype, torch.is_autocast_enabled("cpu")))
        return objective(model_pred, noisy_latents, latents, timesteps, **kw)

    hook = vae.decoder.mid_block.register_forward_pre_hook(lambda mod, inp: decoder_dtypes.append(inp[0].dtype))
    original_forward = unet.forward

    def bf16_forward(*a, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original_forward(*a, **kw)

    unet.forward = bf16_forward
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    loss, metrics = tr.compute_losses(
        unet=unet, batch_latents=latents, noise=torch.randn(2, 4, 8, 8, generator=g),
        prompt_embeds=torch.randn(2, 77, 64, generator=g), pooled_embeds=torch.randn(2, 32, generator=g),
        add_time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), noise_scheduler=sched,
        prediction_type="epsilon", args=args, lpl_objective=recording_objective, global_step=0,
        alphas_cumprod=sched.alphas_cumprod.float(), generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert calls and calls[0][1:] == (torch.float32, torch.float32, False)
    assert decoder_dtypes and all(d == torch.float32 for d in decoder_dtypes)
    assert float(metrics["lpl_applied_ratio"]) == 1.0 and float(metrics["lpl_loss"]) > 0
    assert torch.allclose(loss, metrics["diffusion_loss"] + metrics["lpl_loss"])
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in unet.parameters())
    assert all(p.grad is None for p in vae.parameters())


# ----------------------------------------------------------------------------------------------------
# accelerate launch runs (tiny model, 64px)
# ----------------------------------------------------------------------------------------------------


def test_two_step_run_writes_pipeline_and_reports(tmp_path, tiny_cache, accelerate_configs):
    out = tmp_path / "out"
    proc = launch(accelerate_configs, tiny_cache, [*FAST, "--output_dir", str(out), "--max_train_steps", "2",
                                                   "--checkpointing_steps", "2"])
    assert (out / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert (out / tr.LOSS_PLOT).stat().st_size > 1000
    assert sorted(p.name for p in (out / "validation").glob("*.png"))  # per-prompt images + grid
    assert (out / "validation" / "step000002_grid.png").is_file()
    assert checkpoint_names(out) == {"checkpoint-2"}
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r["diffusion_loss"]) > 0 and 0 <= float(r["lpl_applied_ratio"]) <= 1
    assert "lpl_ratio=" in proc.stderr and "diff=" in proc.stderr  # progress bar postfix

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert pipe.unet.config.addition_embed_type == "text_time"
    # The checkpoint has the diffusers layout (save/load hooks): its unet/ loads with from_pretrained and,
    # the run ending at that step, holds the final weights; accelerate did not also write a model file.
    ckpt = out / "checkpoint-2"
    assert not list(ckpt.glob("model*.safetensors")) and not (ckpt / "unet_ema").exists()
    ckpt_unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    final = pipe.unet.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in ckpt_unet.state_dict().items())


def test_restored_ema_is_moved_to_the_training_device(tmp_path, tiny_cache):
    """Resuming with --use_ema: accelerate's loading lands on the CPU; an EMA left there crashes its first
    step on a GPU (CPU and device tensors mixed). ``restore_ema`` (the load hook) moves it to the given
    device, which the trainer sets to the accelerator's, i.e. the UNet's. 'meta' stands in for a GPU here."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = UNet2DConditionModel.from_pretrained(ts.ensure_tiny_sdxl(tiny_cache), subfolder="unet")
    ema = EMAModel(unet.parameters(), decay=0.9, model_cls=UNet2DConditionModel, model_config=unet.config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.25)
    ema.step(unet.parameters())
    ema.save_pretrained(str(tmp_path / "unet_ema"))
    for device in ("meta", "cpu"):
        fresh = EMAModel(unet.parameters(), decay=0.5, model_cls=UNet2DConditionModel, model_config=unet.config)
        tr.restore_ema(fresh, tmp_path / "unet_ema", torch.device(device))
        assert {p.device.type for p in fresh.shadow_params} == {device}
        assert fresh.optimization_step == ema.optimization_step == 1 and fresh.decay == 0.9
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, ema.shadow_params))


def test_checkpoint_limit_and_resume_continue_at_saved_step(tmp_path, tiny_cache, accelerate_configs):
    """Also covers --train_data_dir (imagefolder with metadata.jsonl)."""
    data = sd.write_imagefolder(tmp_path / "imgs", 6, width=72, height=64)
    out = tmp_path / "out"
    common = [*FAST, "--output_dir", str(out), "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
              "--num_validation_images", "0", "--train_data_dir", str(data), "--center_crop"]
    launch(accelerate_configs, tiny_cache, [*common, "--max_train_steps", "6"])
    assert checkpoint_names(out) == {"checkpoint-4", "checkpoint-6"}
    proc = launch(accelerate_configs, tiny_cache, [*common, "--max_train_steps", "8",
                                                   "--resume_from_checkpoint", "latest"])
    assert "at step 6" in proc.stderr
    assert checkpoint_names(out) == {"checkpoint-6", "checkpoint-8"}
    steps = [int(r["step"]) for r in read_metrics(out)]
    assert steps == list(range(1, 9))
    state = json.loads((out / "checkpoint-8" / tr.CHECKPOINT_STATE_FILE).read_text())
    assert state["global_step"] == 8


RUN_MATRIX = {
    # One run per prediction type, each also covering LPL settings; every run is 2 optimiser steps.
    "epsilon-lpl_off-ema": ["--prediction_type", "epsilon", "--no_use_lpl", "--use_ema"],
    "v_prediction-snr-lpl_scale": ["--prediction_type", "v_prediction", "--snr_gamma", "5", "--lpl_scale",
                                   "--lpl_t_threshold", "600"],
    "sample-lpl_start-snr-no_scale-bf16": ["--prediction_type", "sample", "--lpl_start", "1",
                                           "--lpl_t_threshold", "1000", "--mixed_precision", "bf16",
                                           "--snr_gamma", "5", "--no_lpl_scale", "--lpl_num_blocks", "2",
                                           "--no_lpl_grad_ckpt", "--gradient_checkpointing", "--save_precision",
                                           "bf16"],
    "flow_matching-accum-cached": ["--prediction_type", "flow_matching", "--lpl_t_threshold", "1000",
                                   "--gradient_accumulation_steps", "2", "--cache_latents", "--random_flip",
                                   "--lpl_norm_type", "batch", "--lpl_loss_type", "l1"],
}


@pytest.mark.parametrize("name", list(RUN_MATRIX))
def test_prediction_types_and_lpl_settings(name, tmp_path, tiny_cache, accelerate_configs):
    out = tmp_path / "out"
    extra = []
    if name.startswith("v_prediction"):
        # The real-weights code path: an explicit local pipeline folder instead of the offline default.
        extra = ["--pretrained_model_name_or_path", str(ts.ensure_tiny_sdxl(tiny_cache)), "--num_train_epochs", "1",
                 "--num_synthetic_examples", "4"]
    proc = launch(accelerate_configs, tiny_cache, [*FAST, "--output_dir", str(out), "--num_validation_images", "1",
                                                   *RUN_MATRIX[name], *(extra or ["--max_train_steps", "2"])])
    assert f"mixed_precision={'bf16' if 'bf16' in name else 'no'} " in proc.stderr
    rows = read_metrics(out)
    assert len(rows) == 2 and (out / "unet").is_dir()
    assert list((out / "validation").glob("*_grid.png"))
    ratio = [float(r["lpl_applied_ratio"]) for r in rows]
    lpl = [float(r["lpl_loss"]) for r in rows]
    if "lpl_off" in name:
        assert all(v != v for v in ratio) and all(v != v for v in lpl)  # NaN: LPL never computed
        assert all(float(r["loss"]) == float(r["diffusion_loss"]) for r in rows)
    elif "lpl_start" in name:
        # --lpl_start 1: step 1 (global_step 0) has no LPL (no sample, so no value: NaN, not a 0 that would
        # read as a perfect loss), step 2 applies it to every sample.
        assert ratio[0] == 0 and lpl[0] != lpl[0]
        assert ratio[1] == 1 and lpl[1] > 0
    else:
        assert all(np.isfinite(lpl)) and all(np.isfinite([float(r["loss"]) for r in rows]))
    if "bf16" in name:
        # --save_precision bf16: UNet and text encoders saved in bf16, the VAE in fp32.
        from safetensors import safe_open

        for sub, dtype in (("unet", torch.bfloat16), ("text_encoder", torch.bfloat16), ("vae", torch.float32)):
            file = next((out / sub).glob("*.safetensors"))
            with safe_open(str(file), "pt") as fh:
                assert {fh.get_tensor(k).dtype for k in fh.keys()} == {dtype}, sub
    if name == "flow_matching-accum-cached":
        assert all(v == 1 for v in ratio) and all(v > 0 for v in lpl)
        sched_cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert sched_cfg["_class_name"] == "DPMSolverMultistepScheduler"
        assert sched_cfg["use_flow_sigmas"] and sched_cfg["prediction_type"] == "flow_prediction"
        # The saved flow-matching pipeline samples as it is (FlowMatchEulerDiscreteScheduler could not: no
        # init_noise_sigma, no scale_model_input), with classifier-free guidance.
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a large red circle on a white background", height=64, width=64, num_inference_steps=3,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0
    else:
        sched_cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert sched_cfg["prediction_type"] == RUN_MATRIX[name][1]


def test_bad_argument_exits_before_building_models(tmp_path, accelerate_configs):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    proc = launch(accelerate_configs, cache, ["--output_dir", str(out), "--lpl_num_blocks", "7"], check=False)
    assert proc.returncode != 0
    assert "--lpl_num_blocks must be between 0 and 4" in proc.stderr
    assert not cache.exists() and not out.exists()  # nothing built, nothing written


@pytest.mark.slow
def test_two_processes_train_with_gloo(tmp_path, tiny_cache, accelerate_configs):
    """Two gloo processes with LoRA on the UNet and both text encoders (DDP over three models, one of them
    with adapters that get no gradient) and --cache_latents (each process encodes half, then they share)."""
    out = tmp_path / "out"
    proc = launch(accelerate_configs, tiny_cache, [*FAST, "--output_dir", str(out), "--max_train_steps", "2",
                                                   "--checkpointing_steps", "2", "--lpl_t_threshold", "1000",
                                                   "--rank", "4", "--train_text_encoder", "--cache_latents"],
                  processes=2)
    assert "processes=2" in proc.stderr
    assert (out / tr.LORA_WEIGHT_NAME).is_file() and checkpoint_names(out) == {"checkpoint-2"}
    assert (out / "checkpoint-2" / tr.LORA_WEIGHT_NAME).is_file()
    ckpt = out / "checkpoint-2"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    rows = read_metrics(out)
    assert len(rows) == 2 and all(float(r["lpl_applied_ratio"]) == 1 for r in rows)


@pytest.mark.skipif(tr._has_accelerator_device(), reason="accelerate starts one process per GPU by itself")
def test_num_processes_without_multi_gpu_stops_with_the_command_that_works(tmp_path):
    """Without GPUs, `accelerate launch --num_processes 2` (no --multi_gpu, no config file) starts one process
    and says nothing: the trainer stops before building anything and names the command docs/training.md shows."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**_env(cache), "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", SCRIPT, "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert f"accelerate launch --multi_gpu --num_processes N {SCRIPT} --output_dir {out}\n" in proc.stderr
    assert not cache.exists() and not out.exists()


def _trace(path: Path) -> dict[int, list[int]]:
    """{step: indices} from a single-process sample trace (one micro-batch per step)."""
    rows = [json.loads(line) for line in Path(f"{path}.rank0").read_text().splitlines()]
    return {r["step"]: r["indices"] for r in rows}


@pytest.mark.slow
def test_killed_run_resumes_exactly_as_the_uninterrupted_run(tmp_path, tiny_cache, accelerate_configs):
    """SIGKILL mid-training, resume from 'latest': the resumed steps train on exactly the uninterrupted run's
    examples in the same order (seeded sampler with its epoch restored, per-example augmentation and caption
    dropout), and the UNet and its EMA end bit-identical. Also: checkpoints have unet/ and unet_ema/, and
    --validation_epochs validates after the epochs of diffusers' schedule."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    common = [*FAST, "--checkpointing_steps", "2", "--checkpoints_total_limit", "3", "--num_validation_images", "0",
              "--use_ema", "--random_flip", "--proportion_empty_prompts", "0.3", "--lpl_t_threshold", "500"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_configs["single"]),
           SCRIPT, *common, "--output_dir", str(out), "--max_train_steps", "100000"]
    env = {**_env(tiny_cache), tr.SAMPLE_TRACE_ENV_VAR: str(tmp_path / "killed")}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # Event-driven: kill as soon as the first complete checkpoint exists (its state file is written last
        # and the folder renamed into place). The bound only stops a hung run, it is not a timing assumption.
        deadline = time.monotonic() + 900
        while not tr.list_checkpoints(out):
            assert proc.poll() is None, "training exited early"
            assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher process group, mid-training
        proc.wait(timeout=60)
    saved = tr.list_checkpoints(out)[-1][0]
    assert (out / f"checkpoint-{saved}" / "unet").is_dir() and (out / f"checkpoint-{saved}" / "unet_ema").is_dir()
    target = saved + 3  # 4 steps per epoch: the resumed part crosses an epoch boundary
    proc = launch(accelerate_configs, tiny_cache, [*common, "--output_dir", str(out), "--max_train_steps",
                                                   str(target), "--resume_from_checkpoint", "latest"],
                  env={tr.SAMPLE_TRACE_ENV_VAR: str(tmp_path / "resumed")})
    assert f"at step {saved}" in proc.stderr
    launch(accelerate_configs, tiny_cache, [*common, "--output_dir", str(ref), "--max_train_steps", str(target),
                                            "--num_validation_images", "1", "--validation_epochs", "1"],
           env={tr.SAMPLE_TRACE_ENV_VAR: str(tmp_path / "reference")})

    # Sample order: before the checkpoint from the killed run, after it from the resumed one.
    reference, killed, resumed = (_trace(tmp_path / n) for n in ("reference", "killed", "resumed"))
    assert sorted(resumed) == list(range(saved + 1, target + 1))
    combined = {**{s: killed[s] for s in range(1, saved + 1)}, **resumed}
    assert combined == reference
    for epoch_start in range(1, target - 2, 4):  # each complete epoch sees every example exactly once
        seen = sorted(i for s in range(epoch_start, epoch_start + 4) for i in reference[s])
        assert seen == list(range(8))

    steps = [int(r["step"]) for r in read_metrics(out)]
    assert steps == list(range(1, target + 1))  # rows after the checkpoint from the killed run dropped
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(ref)]
    from safetensors.torch import load_file

    # Same weights, bit for bit: the trained UNet and the EMA at the last common checkpoint, and the
    # saved pipeline's UNet (the EMA weights).
    last = saved + 2
    for sub in (f"checkpoint-{last}/unet", f"checkpoint-{last}/unet_ema", "unet"):
        a = load_file(str(out / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(ref / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert not list(out.glob(".tmp-*"))
    # --validation_epochs 1: after every epoch that ends before the last step (diffusers' `epoch % N == 0`),
    # plus the final validation.
    grids = sorted(int(p.name[4:10]) for p in (ref / "validation").glob("step*_grid.png"))
    assert grids == [*range(4, target, 4), target]
