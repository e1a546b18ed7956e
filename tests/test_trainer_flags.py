"""The diffusers-SDXL-script flags of train_sdxl_lpl.py, each tested for what it does.

Timestep bias and caption dropout are measured on many draws against their closed forms; flags that
cannot work on this machine (8-bit Adam, xformers, Hub upload) must fail at argument parsing, naming the
flag; the Hub upload is the run's last step and a failed upload loses nothing (a subprocess run with the
Hub functions replaced, no network).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_sdxl_lpl as tr  # noqa: E402
from test_train_sdxl_lpl import FAST, _env, tiny_cache  # noqa: E402,F401


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        tr.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _within(observed: float, p: float, n: int, sds: float = 5.0) -> bool:
    """Binomial fraction ``observed`` of ``n`` draws agrees with probability ``p`` to ``sds`` standard errors."""
    return abs(observed - p) <= sds * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------------------------------
# Timestep bias
# ----------------------------------------------------------------------------------------------------


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012)


def _draw(prediction_type: str, probs, n: int = 40000) -> torch.Tensor:
    z = torch.zeros(n, 1, 1, 1)
    out = tr.sample_noisy_latents(z, z, prediction_type, _scheduler(), torch.Generator().manual_seed(0), probs)
    return out["timesteps"].float()


@pytest.mark.parametrize("strategy, kwargs, lo, hi, k", [
    # diffusers' generate_timestep_weights: weight m on k biased timesteps, 1 elsewhere, normalised, so
    # P(biased) = m k / (m k + T - k).
    ("later", dict(multiplier=2.0, portion=0.25), 750, 1000, 250),
    ("earlier", dict(multiplier=3.0, portion=0.2), 0, 200, 200),
    ("range", dict(multiplier=5.0, begin=100, end=300), 100, 300, 200),
])
@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_matching"])
def test_timestep_bias_changes_the_sampled_distribution_as_documented(strategy, kwargs, lo, hi, k, prediction_type):
    T, n = 1000, 40000
    m = kwargs["multiplier"]
    probs = tr.timestep_weights(strategy, T, **kwargs)
    assert probs.shape == (T,) and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    expected = m * k / (m * k + T - k)
    t = _draw(prediction_type, probs, n)
    inside = ((t >= lo) & (t < hi)).float().mean().item()
    assert _within(inside, expected, n), (inside, expected)
    # Within the biased and the unbiased parts the draw stays uniform: each half of the biased range
    # holds half of its mass.
    mid = (lo + hi) / 2
    first_half = ((t >= lo) & (t < mid)).float().mean().item()
    assert _within(first_half, expected / 2, n)
    # Without bias, the same range gets k / T of the draws.
    plain = _draw(prediction_type, None, n)
    assert _within(((plain >= lo) & (plain < hi)).float().mean().item(), k / T, n)
    if prediction_type == "flow_matching":
        assert t.min() >= 1.0 and t.max() <= T  # timestep = sigma * T with sigma in [1/T, 1]
    else:
        assert t.min() >= 0 and t.max() <= T - 1 and torch.equal(t, t.round())


def test_earlier_bias_raises_the_share_of_lpl_samples():
    """With --lpl_t_threshold 200, 'earlier' x3 on the first 20% of timesteps sends 43% of the samples to LPL
    instead of 20% (P = 3*200 / (3*200 + 800))."""
    probs = tr.timestep_weights("earlier", 1000, multiplier=3.0, portion=0.2)
    share = (_draw("epsilon", probs) < 200).float().mean().item()
    assert _within(share, 600 / 1400, 40000)


def test_timestep_bias_none_and_bad_values(capsys):
    assert tr.timestep_weights("none", 1000, multiplier=7.0) is None
    assert "--timestep_bias_multiplier must be a positive number" in _parse_error(
        ["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "0"], capsys)
    assert "--timestep_bias_portion must be in (0, 1]" in _parse_error(
        ["--timestep_bias_strategy", "earlier", "--timestep_bias_portion", "1.5"], capsys)
    assert "--timestep_bias_end must be > --timestep_bias_begin" in _parse_error(
        ["--timestep_bias_strategy", "range", "--timestep_bias_begin", "500", "--timestep_bias_end", "400"], capsys)
    assert "--timestep_bias_begin must be >= 0" in _parse_error(
        ["--timestep_bias_strategy", "range", "--timestep_bias_begin", "-1"], capsys)
    assert "invalid choice: 'middle'" in _parse_error(["--timestep_bias_strategy", "middle"], capsys)
    # The end is checked against the scheduler's timestep count once it is known.
    with pytest.raises(ValueError, match="timestep_bias_end: 1200 is past the scheduler's 1000 timesteps"):
        tr.timestep_weights("range", 1000, begin=0, end=1200)


# ----------------------------------------------------------------------------------------------------
# Caption dropout, --max_train_samples, --local_rank
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_fraction_of_empty_prompts_matches_the_flag(p):
    n = 20000
    dropped = [tr.drop_caption(0, epoch, i, p) for epoch in range(2) for i in range(n // 2)]
    fraction = sum(dropped) / n
    if p in (0.0, 1.0):
        assert fraction == p
    else:
        assert _within(fraction, p, n), fraction
        # Drawn anew each epoch: the dropped examples of epoch 0 and 1 are independent.
        both = sum(a and b for a, b in zip(dropped[: n // 2], dropped[n // 2:])) / (n // 2)
        assert _within(both, p * p, n // 2)


class _Source:
    """n tiny captioned images (caption = index)."""

    def __init__(self, n: int):
        from PIL import Image

        self.n, self.image = n, Image.new("RGB", (8, 8), "red")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.image, f"caption {index}"


def test_datasets_apply_the_caption_dropout_per_epoch(capsys):
    n, p = 2000, 0.3
    ds = tr.TrainDataset(_Source(n), 8, center_crop=True, random_flip=False, seed=5, proportion_empty_prompts=p)
    empty = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(n)]
        empty[epoch] = {it["index"] for it in items if it["caption"] == ""}
        assert all(it["caption"] == f"caption {it['index']}" for it in items if it["index"] not in empty[epoch])
        assert _within(len(empty[epoch]) / n, p, n)
        assert empty[epoch] == {i for i in range(n) if tr.drop_caption(5, epoch, i, p)}
    assert empty[0] != empty[1]
    # Cached latents keep their caption and drop it per epoch the same way.
    cached = tr.CachedLatentDataset([{"latents": torch.zeros(1), "caption": f"caption {i}", "index": i}
                                     for i in range(n)], seed=5, proportion_empty_prompts=p)
    cached.set_epoch(1)
    assert {i for i in range(n) if cached[i]["caption"] == ""} == empty[1]
    assert cached.items[next(iter(empty[1]))]["caption"] != ""  # the cache itself is not modified
    assert "--proportion_empty_prompts must be in [0, 1]" in _parse_error(["--proportion_empty_prompts", "1.5"],
                                                                           capsys)


def test_max_train_samples_is_a_seeded_shuffle_not_the_first_n():
    full = tr.ImageCaptionSource(tr.parse_args(["--num_synthetic_examples", "64"]))
    assert full.indices == list(range(64))
    picks = {}
    for seed in (0, 1):
        src = tr.ImageCaptionSource(tr.parse_args(["--num_synthetic_examples", "64", "--max_train_samples", "8",
                                                   "--seed", str(seed)]))
        assert len(src) == 8 and len(set(src.indices)) == 8 and all(0 <= i < 64 for i in src.indices)
        assert src.indices == torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:8].tolist()
        # Example k of the subset is raw example indices[k] (same image and caption).
        assert src[3][1] == full[src.indices[3]][1]
        picks[seed] = src.indices
    assert picks[0] != list(range(8)) and picks[0] != picks[1]


def test_local_rank_flag_and_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert tr.parse_args([]).local_rank == -1
    assert tr.parse_args(["--local_rank", "2"]).local_rank == 2
    monkeypatch.setenv("LOCAL_RANK", "3")  # as diffusers: the launcher's value wins
    assert tr.parse_args(["--local_rank", "2"]).local_rank == 3


# ----------------------------------------------------------------------------------------------------
# Flags that cannot work here: clear errors at parsing, before anything is loaded
# ----------------------------------------------------------------------------------------------------


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    err = _parse_error(["--use_8bit_adam"], capsys)
    assert "--use_8bit_adam cannot be used: bitsandbytes is not importable" in err and "pip install" in err


def _fake_bitsandbytes(monkeypatch, step_error: Exception | None):
    class AdamW8bit(torch.optim.AdamW):
        def step(self, closure=None):
            if step_error is not None:
                raise step_error
            return super().step(closure)

    module = types.ModuleType("bitsandbytes")
    module.__version__ = "0.0-test"
    module.optim = SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)
    return AdamW8bit


def test_8bit_adam_that_cannot_run_on_this_device_is_a_clear_error(monkeypatch, capsys):
    _fake_bitsandbytes(monkeypatch, RuntimeError("no 8-bit kernels for cpu"))
    err = _parse_error(["--use_8bit_adam"], capsys)
    assert "--use_8bit_adam cannot be used: bitsandbytes 0.0-test cannot run AdamW8bit on cpu" in err
    assert "no 8-bit kernels for cpu" in err


def test_8bit_adam_is_used_when_it_works(monkeypatch):
    cls = _fake_bitsandbytes(monkeypatch, None)
    args = tr.parse_args(["--use_8bit_adam", "--adam_beta1", "0.8"])
    opt = tr.build_optimizer(args, [torch.nn.Parameter(torch.zeros(3))], 1e-3)
    assert type(opt) is cls and opt.defaults["betas"] == (0.8, 0.999)
    assert type(tr.build_optimizer(tr.parse_args([]), [torch.nn.Parameter(torch.zeros(3))], 1e-3)) is torch.optim.AdamW


def test_xformers_errors(monkeypatch, capsys):
    import diffusers.utils.import_utils as iu

    monkeypatch.setattr(iu, "is_xformers_available", lambda: False)
    assert ("--enable_xformers_memory_efficient_attention cannot be used: xformers is not installed"
            in _parse_error(["--enable_xformers_memory_efficient_attention"], capsys))
    monkeypatch.setattr(iu, "is_xformers_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "runs on CUDA GPUs only" in _parse_error(["--enable_xformers_memory_efficient_attention"], capsys)


def test_npu_flash_attention_without_an_npu_is_a_clear_error(capsys):
    err = _parse_error(["--enable_npu_flash_attention"], capsys)
    assert "--enable_npu_flash_attention cannot be used: it needs the torch_npu extension" in err


def test_hub_flag_errors(monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "--push_to_hub cannot be used: HF_HUB_OFFLINE is set" in _parse_error(
        ["--push_to_hub", "--hub_token", "x"], capsys)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "--push_to_hub cannot be used: no Hub token" in _parse_error(["--push_to_hub"], capsys)
    assert "--hub_token cannot be combined with --report_to wandb" in _parse_error(
        ["--push_to_hub", "--hub_token", "x", "--report_to", "wandb"], capsys)
    assert "--hub_model_id only has an effect with --push_to_hub" in _parse_error(["--hub_model_id", "me/m"], capsys)
    assert tr.parse_args(["--push_to_hub", "--hub_token", "x"]).push_to_hub


# ----------------------------------------------------------------------------------------------------
# The upload is the last step; a failed upload loses nothing (subprocess run, Hub functions replaced)
# ----------------------------------------------------------------------------------------------------

_RUNNER = '''
import json, os, sys
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, {root!r})
import huggingface_hub

record = Path({record!r})

def create_repo(repo_id, exist_ok=False, token=None, **kw):
    if {fail_create!r}:
        raise ConnectionError("no route to huggingface.co (simulated)")
    record.with_suffix(".create").write_text(json.dumps({{"repo_id": repo_id, "token": token}}))
    return SimpleNamespace(repo_id="someone/" + repo_id)

def upload_folder(repo_id, folder_path, commit_message=None, ignore_patterns=None, token=None, **kw):
    files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
    record.write_text(json.dumps({{"repo_id": repo_id, "files": files, "ignore": ignore_patterns,
                                   "message": commit_message}}))
    raise ConnectionError("connection reset during upload (simulated)")

huggingface_hub.create_repo = create_repo
huggingface_hub.upload_folder = upload_folder
import train_sdxl_lpl
train_sdxl_lpl.main(sys.argv[1:])
'''


def _run_with_fake_hub(tmp_path, cache, args, *, fail_create: bool):
    runner = tmp_path / "runner.py"
    record = tmp_path / "upload.json"
    runner.write_text(_RUNNER.format(root=str(ROOT), record=str(record), fail_create=fail_create))
    env = _env(cache)
    env.pop("HF_HUB_OFFLINE", None)  # the Hub functions are replaced: nothing can reach the network
    proc = subprocess.run([sys.executable, str(runner), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    return proc, record


@pytest.mark.slow
def test_upload_is_the_last_step_and_a_failed_upload_loses_nothing(tmp_path, tiny_cache):
    out = tmp_path / "my-sdxl-lpl"
    proc, record = _run_with_fake_hub(tmp_path, tiny_cache, [
        *FAST, "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--push_to_hub", "--hub_token", "hf_test"], fail_create=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "--push_to_hub: the upload to someone/my-sdxl-lpl failed (ConnectionError" in proc.stderr
    assert f"the trained model is saved in {out}" in proc.stderr
    assert json.loads(record.with_suffix(".create").read_text()) == {"repo_id": "my-sdxl-lpl", "token": "hf_test"}
    upload = json.loads(record.read_text())
    assert upload["repo_id"] == "someone/my-sdxl-lpl" and upload["message"] == "End of training"
    # When the upload started, every output was already written: the pipeline, the metrics, the plot,
    # the validation images, the model card. Checkpoints are excluded from the upload.
    at_upload = set(upload["files"])
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 tr.METRICS_CSV, tr.LOSS_PLOT, "README.md", "validation/step000002_grid.png"):
        assert name in at_upload, name
    assert "checkpoint-*" in upload["ignore"]
    # The failure lost nothing: the folder is as it was when the upload began.
    now = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert now == at_upload
    assert "someone/my-sdxl-lpl" in (out / "README.md").read_text()

    from diffusers import StableDiffusionXLPipeline

    assert StableDiffusionXLPipeline.from_pretrained(str(out)).unet is not None


def test_unreachable_hub_fails_before_any_model_loads(tmp_path):
    cache = tmp_path / "cache"  # the tiny pipeline would be built here if a model were loaded
    out = tmp_path / "out"
    proc, _ = _run_with_fake_hub(tmp_path, cache, [*FAST, "--output_dir", str(out), "--push_to_hub",
                                                   "--hub_token", "hf_test"], fail_create=True)
    assert proc.returncode == 1
    assert "--push_to_hub: cannot create or reach the Hub repository 'out'" in proc.stderr
    assert "Nothing was trained" in proc.stderr
    assert not cache.exists()
    assert not [p for p in out.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------------------------------
# Logged LPL value, cached latents across processes, seed on resume
# ----------------------------------------------------------------------------------------------------


def test_logged_lpl_loss_ignores_micro_batches_without_lpl_samples():
    """A micro-batch where no sample was below the threshold reports lpl_loss 0; the step's logged value is
    the mean over the samples LPL was applied to, not diluted by that 0."""
    m = tr.StepMetrics(tr.metric_names(0))
    for values in ({"loss": 1.0, "lpl_loss": 0.0, "lpl_num_samples": 0.0, "lpl_applied_ratio": 0.0,
                    "lpl_layer0_loss": 0.0},
                   {"loss": 3.0, "lpl_loss": 0.6, "lpl_num_samples": 1.0, "lpl_applied_ratio": 0.5,
                    "lpl_layer0_loss": 0.2},
                   {"loss": 2.0, "lpl_loss": 0.3, "lpl_num_samples": 2.0, "lpl_applied_ratio": 1.0,
                    "lpl_layer0_loss": 0.5}):
        metrics = {k: torch.tensor(v) for k, v in values.items()}
        m.add(metrics, tr.metric_weights(metrics))
    out = m.pop()
    assert out["loss"] == pytest.approx(2.0)
    assert out["lpl_applied_ratio"] == pytest.approx(0.5)
    assert out["lpl_loss"] == pytest.approx((0.6 * 1 + 0.3 * 2) / 3)  # per applied sample
    assert out["lpl_layer0_loss"] == pytest.approx((0.2 * 1 + 0.5 * 2) / 3)
    m.add({"lpl_loss": torch.tensor(0.0), "lpl_num_samples": torch.tensor(0.0)},
          tr.metric_weights({"lpl_loss": torch.tensor(0.0), "lpl_num_samples": torch.tensor(0.0)}))
    assert math.isnan(m.pop()["lpl_loss"])  # no sample at all: no value, rather than a misleading 0


class _NoisyPoolingVAE:
    """Stand-in VAE: posterior mean = 8x average pooling, std 0.5; counts encoded images."""

    device = torch.device("cpu")
    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)

    def __init__(self):
        self.encoded = 0

    def encode(self, x):
        from diffusers.utils.torch_utils import randn_tensor

        self.encoded += x.shape[0]
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        mean = torch.cat([pooled, pooled[:, :1]], dim=1)

        def sample(generator=None):
            return mean + 0.5 * randn_tensor(mean.shape, generator=generator, dtype=mean.dtype)

        return SimpleNamespace(latent_dist=SimpleNamespace(sample=sample))


def test_cache_latents_encodes_each_example_once_across_processes():
    from lpl_ext.demo import synthetic_data as sd

    source = [sd.draw_example(i, width=40, height=32) for i in range(5)]
    ds = tr.TrainDataset(source, 16, center_crop=False, random_flip=True, seed=3)
    single_vae = _NoisyPoolingVAE()
    single = tr.build_cached_latents(ds, single_vae, batch_size=2)
    assert single_vae.encoded == 5

    vaes = [_NoisyPoolingVAE(), _NoisyPoolingVAE()]
    captured = {}

    def capture(items):
        captured["rank1"] = items
        raise _Captured

    with pytest.raises(_Captured):  # process 1's share, as its gather_object call would send it
        tr.build_cached_latents(ds, vaes[1], batch_size=2, process_index=1, num_processes=2, gather=capture)

    def gather(items):  # accelerate's gather_object: every process's items, in rank order
        return items + captured["rank1"]

    sharded = tr.build_cached_latents(ds, vaes[0], batch_size=2, process_index=0, num_processes=2,
                                      gather=gather)
    assert (vaes[0].encoded, vaes[1].encoded) == (3, 2)  # each process encodes its share, not everything
    assert len(sharded) == len(single) == 5
    for a, b in zip(single.items, sharded.items):
        assert a["index"] == b["index"] and a["crop_top_left"] == b["crop_top_left"] and a["caption"] == b["caption"]
        # Per-example crops and posterior noise: the cache does not depend on the process count.
        assert torch.equal(a["latents"], b["latents"])
    assert len({it["crop_top_left"] for it in single.items}) > 1


class _Captured(Exception):
    pass


def test_resuming_with_another_seed_is_refused(tmp_path, capsys):
    """The seed fixes the sampler's permutation of every epoch; resuming under another seed would replay a
    different order, so the trainer refuses at argument parsing (from the checkpoint's state file)."""
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / tr.CHECKPOINT_STATE_FILE).write_text(json.dumps({"global_step": 2, "seed": 7, "epoch": 0}))
    for spec in ("latest", str(ckpt)):
        err = _parse_error(["--output_dir", str(tmp_path), "--resume_from_checkpoint", spec, "--seed", "0"], capsys)
        assert "--seed 0 differs from the seed 7 of" in err and "resume with --seed 7" in err
    assert tr.parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest", "--seed", "7"])


def test_lpl_sync_free_flag_gives_the_synced_objectives_loss(capsys):
    """--lpl_sync_free builds LPLObjective(sync_free=True) (no host sync per micro-batch); with the
    whole batch as capacity its loss and logs are the synced objective's."""
    from reference_lpl import tiny_vae
    from test_train_sdxl_lpl import _scheduler
    from tolerance import assert_close_to_scale

    assert "--lpl_capacity sets the decoder batch" in _parse_error(["--lpl_capacity", "2"], capsys)
    assert "--lpl_capacity must be a positive" in _parse_error(["--lpl_sync_free", "--lpl_capacity", "0"], capsys)
    vae = tiny_vae("sdxl_like", seed=3)
    synced = tr.build_lpl_objective(tr.parse_args([]), vae)
    free = tr.build_lpl_objective(tr.parse_args(["--lpl_sync_free"]), vae)
    capped = tr.build_lpl_objective(tr.parse_args(["--lpl_sync_free", "--lpl_capacity", "1"]), vae)
    assert (synced.sync_free, free.sync_free, free.capacity, capped.capacity) == (False, True, None, 1)
    sched = _scheduler()
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([50, 900, 120])  # two of three below the default threshold of 200
    noisy = sched.add_noise(latents, noise, t)
    pred = (noise + 0.3 * torch.randn(3, 4, 8, 8, generator=g)).requires_grad_(True)
    kw = dict(prediction_type="epsilon", alphas_cumprod=sched.alphas_cumprod)
    want, want_logs = synced(pred, noisy, latents, t, **kw)
    got, got_logs = free(pred, noisy, latents, t, **kw)
    assert float(want_logs["lpl_num_samples"]) == 2 and float(want) > 0
    assert_close_to_scale(got, want, rtol=1e-5, what="lpl")
    assert set(got_logs) == set(want_logs)
    # the per-layer feature statistics cover every decoded sample in sync-free mode (documented
    # in lpl_ext/objective.py); losses, counts and ratios are the synced objective's
    for key in (k for k in want_logs if not k.endswith(("_mean", "_std", "_outlier_ratio"))):
        assert_close_to_scale(got_logs[key].float(), want_logs[key].float(), rtol=1e-5, what=key)
    (g_got,) = torch.autograd.grad(got, pred)
    (g_want,) = torch.autograd.grad(want, pred)
    assert_close_to_scale(g_got, g_want, rtol=1e-5, what="gradient")
    _, capped_logs = capped(pred, noisy, latents, t, **kw)
    assert float(capped_logs["lpl_num_samples"]) == 1  # the second qualifying sample is past the capacity


def test_step_metrics_stack_a_micro_batch_into_one_vector():
    """add() keeps one (names,) vector of sums and one of weights, whatever the number of names; unseen
    names pop as NaN, a name outside the list (in the values or the weights) raises, a step without any add
    pops all NaN."""
    names = tr.metric_names(1)
    m = tr.StepMetrics(names)
    assert all(math.isnan(v) for v in m.pop().values())
    with pytest.raises(ValueError, match="not_a_metric"):
        m.add({"loss": torch.tensor(1.0), "lpl_layer1_std": 0.5, "not_a_metric": torch.tensor(9.0)})
    with pytest.raises(ValueError, match="lpl_layer2_std"):  # metric_names(1): layers 0 and 1 only
        m.add({"loss": torch.tensor(1.0)}, {"lpl_layer2_std": torch.tensor(1.0)})
    m.add({"loss": torch.tensor(1.0), "lpl_layer1_std": 0.5})
    m.add({"loss": torch.tensor(3.0)}, {"loss": torch.tensor(3.0)})
    assert m.sums.shape == m.counts.shape == (len(names),)
    out = m.pop()
    assert out["loss"] == pytest.approx((1.0 + 9.0) / 4) and out["lpl_layer1_std"] == 0.5
    assert math.isnan(out["lpl_loss"]) and "not_a_metric" not in out
