"""Switching from the diffusers reference to lpl_ext's LatentPerceptualLoss
(docs/switching.md): the one-time notice, LPL_EXT_REFERENCE_COMPAT, ``vae`` assignment,
the module's state and reference-era state_dicts, and the "done means" check: the
reference trainer's own LPL call pattern, unchanged, through a one-line ``lpl_loss.py``
shim, in a fresh process.

Oracle for the reference's loss: tests/reference_lpl.py's ReferenceLPL (a plain-PyTorch
restatement of the reference class, checked against the reference's recorded outputs in
tests/test_module_parity.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lpl_ext import LatentPerceptualLoss, LPLObjective
from lpl_ext import lpl_loss as lpl_module
from reference_lpl import ReferenceLPL, tiny_vae
from tolerance import assert_close_to_scale

TESTS = Path(__file__).parent
NOTICE = "does not compute the diffusers reference's loss"


@pytest.fixture
def fresh_notice(monkeypatch, caplog):
    """A process that has not logged the notice yet, with the variable unset."""
    monkeypatch.setattr(lpl_module, "_notice_logged", False)
    monkeypatch.delenv("LPL_EXT_REFERENCE_COMPAT", raising=False)
    caplog.set_level(logging.WARNING, logger="lpl_ext")
    return caplog


def notices(caplog):
    return [r for r in caplog.records if NOTICE in r.getMessage()]


def latents(vae, n=2, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    y = torch.randn(n, c, hw, hw, generator=g)
    x = y + 0.3 * torch.randn(n, c, hw, hw, generator=g)
    return x.requires_grad_(True), y


# ---------------------------------------------------------------- the notice

def test_default_construction_logs_the_notice_once_per_process(fresh_notice):
    vae = tiny_vae("sdxl_like")
    lpl = LatentPerceptualLoss(vae)
    assert not lpl.reference_compat
    (record,) = notices(fresh_notice)
    message = record.getMessage()
    assert record.levelno == logging.WARNING and record.name == "lpl_ext.lpl_loss"
    for words in ("post_quant_conv", "Loss scale against the reference", "reference_compat=True",
                  "LPL_EXT_REFERENCE_COMPAT=1", "divide the old weight", "LPL_EXT_REFERENCE_COMPAT=0"):
        assert words in message, words
    LatentPerceptualLoss(vae, norm_type="batch")
    LatentPerceptualLoss(tiny_vae("wide"))
    assert len(notices(fresh_notice)) == 1


@pytest.mark.parametrize("how", ["argument False", "argument True", "environment 0", "environment 1"])
def test_an_explicit_choice_silences_the_notice(fresh_notice, monkeypatch, how):
    vae = tiny_vae("sdxl_like")
    if how.startswith("argument"):
        lpl = LatentPerceptualLoss(vae, reference_compat=how.endswith("True"))
    else:
        monkeypatch.setenv("LPL_EXT_REFERENCE_COMPAT", how[-1])
        lpl = LatentPerceptualLoss(vae)
    assert lpl.reference_compat == how.endswith(("True", "1"))
    assert notices(fresh_notice) == []
    assert not lpl_module._notice_logged  # still available to a later default construction


def test_the_notice_names_what_differs_and_only_when_something_does(fresh_notice):
    # No post_quant_conv (the SD3/Flux-like VAE), shared norm: the reference's arithmetic.
    shifted = tiny_vae("shifted")
    assert shifted.post_quant_conv is None
    assert LatentPerceptualLoss(shifted, norm_type="shared").reference_differences() == []
    LatentPerceptualLoss(shifted, norm_type="shared")
    assert notices(fresh_notice) == []
    batch = LatentPerceptualLoss(shifted, norm_type="batch")
    (record,) = notices(fresh_notice)
    assert "norm_type='batch'" in record.getMessage() and "post_quant_conv before" not in record.getMessage()
    assert batch.reference_differences() == [
        "standardizes each channel for norm_type='batch' (the reference normalizes nothing)"]
    image = LatentPerceptualLoss(shifted, feature_type="image", reference_compat=False)
    assert "per-sample (N,) MSE" in image.reference_differences()[0]
    assert LatentPerceptualLoss(tiny_vae("sdxl_like"), reference_compat=True).reference_differences() == []


def test_the_objective_and_trainer_choose_explicitly(fresh_notice):
    """LPLObjective (and train_sdxl_lpl.py on it) passes reference_compat itself: no notice,
    and the variable does not change it (the trainer has --lpl_reference_compat)."""
    LPLObjective(tiny_vae("sdxl_like"))
    assert notices(fresh_notice) == []


# ---------------------------------------------------------------- LPL_EXT_REFERENCE_COMPAT

@pytest.mark.parametrize("value,want", [("1", True), ("true", True), (" YES ", True), ("on", True),
                                        ("0", False), ("false", False), ("no", False), ("", False)])
def test_reference_compat_variable(monkeypatch, value, want):
    monkeypatch.setenv("LPL_EXT_REFERENCE_COMPAT", value)
    vae = tiny_vae("sdxl_like")
    assert LatentPerceptualLoss(vae).reference_compat is want
    # an explicit argument wins over the environment
    assert LatentPerceptualLoss(vae, reference_compat=not want).reference_compat is (not want)


def test_reference_compat_variable_rejects_other_values(monkeypatch):
    monkeypatch.setenv("LPL_EXT_REFERENCE_COMPAT", "2")
    with pytest.raises(ValueError, match="LPL_EXT_REFERENCE_COMPAT: expected 1 or 0"):
        LatentPerceptualLoss(tiny_vae("sdxl_like"))
    with pytest.raises(TypeError, match="reference_compat: expected a bool or None"):
        LatentPerceptualLoss(tiny_vae("sdxl_like"), reference_compat="yes")


FLAG_SETS = [
    dict(loss_type="mse", norm_type="default", pow_law=False, remove_outliers=True),
    dict(loss_type="l1", norm_type="shared", pow_law=True, remove_outliers=True),
    dict(loss_type="mse", norm_type="batch", pow_law=True, remove_outliers=False, num_mid_blocks=2),
    dict(loss_type="l1", norm_type="default", pow_law=True, remove_outliers=True, grad_ckpt=False),
]


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_variable_makes_a_default_construction_the_reference(monkeypatch, flags):
    """With the variable set, the reference's constructor call gives the reference's
    per-sample loss, per-layer losses and latent gradient (float32, to ~1e-6)."""
    monkeypatch.setenv("LPL_EXT_REFERENCE_COMPAT", "1")
    vae = tiny_vae("sdxl_like", seed=3)
    x, y = latents(vae)
    ours = LatentPerceptualLoss(vae, **flags)
    ref = ReferenceLPL(vae, **flags)
    got, want = ours.get_loss(x, y), ref.get_loss(x, y)
    assert_close_to_scale(got, want, rtol=1e-6, what="loss")
    (g_got,) = torch.autograd.grad(got.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    assert_close_to_scale(g_got, g_want, rtol=1e-5, what="latent gradient")
    for a, b in zip(ours.get_loss(x, y, get_hist=True), ref.get_loss(x, y, get_hist=True)):
        assert_close_to_scale(a.detach(), b.detach(), rtol=1e-6, what="layer loss")
    monkeypatch.delenv("LPL_EXT_REFERENCE_COMPAT")
    fixed = LatentPerceptualLoss(vae, **flags).get_loss(x, y)
    assert not torch.allclose(fixed, want, rtol=1e-3)  # the variable is what made them equal


# ---------------------------------------------------------------- vae assignment

def test_assigning_a_vae_rebinds_the_loss_and_registers_nothing():
    old, new = tiny_vae("sdxl_like", seed=1), tiny_vae("shifted", seed=2)
    lpl = LatentPerceptualLoss(old, norm_type="shared", reference_compat=False)
    lpl.vae = new
    assert lpl.vae is new and lpl.decoder is new.decoder
    assert list(lpl.parameters()) == [] and lpl.state_dict() == {}
    assert list(dict(lpl.named_children())) == ["loss_fn"]  # the reference's MSELoss, no VAE
    assert float(lpl.scale) == new.config.scaling_factor and float(lpl.shift) == new.config.shift_factor
    assert lpl.scale.device == next(new.parameters()).device
    x, y = latents(new)
    fresh = LatentPerceptualLoss(new, norm_type="shared", reference_compat=False)
    torch.testing.assert_close(lpl.get_loss(x, y), fresh.get_loss(x, y), rtol=0, atol=0)
    assert lpl.num_layers == fresh.num_layers
    # .to() now moves the new VAE, not the old one
    lpl.to(torch.float64)
    assert next(new.parameters()).dtype == torch.float64 and next(old.parameters()).dtype == torch.float32
    assert lpl.scale.dtype == torch.float64 and float(lpl.scale) == 1.5305


def test_a_bad_vae_assignment_raises_and_changes_nothing():
    vae = tiny_vae("sdxl_like")
    lpl = LatentPerceptualLoss(vae, reference_compat=False)
    for bad in (None, object(), nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="vae: expected a diffusers AutoencoderKL-like model"):
            lpl.vae = bad
    assert lpl.vae is vae and float(lpl.scale) == vae.config.scaling_factor
    with pytest.raises(AttributeError, match="decoder: follows the VAE"):
        lpl.decoder = tiny_vae("wide").decoder
    assert list(lpl.parameters()) == []


# ---------------------------------------------------------------- state

def test_state_is_empty_and_reference_state_dicts_are_refused_clearly():
    vae = tiny_vae("sdxl_like")
    ours = LatentPerceptualLoss(vae, reference_compat=False)
    ref = ReferenceLPL(vae)
    ref_state = ref.state_dict()
    assert len(list(ref.parameters())) == 180 and len(ref_state) == 284  # the reference holds the VAE
    assert list(ours.parameters()) == [] and ours.state_dict() == {}
    assert {n for n, _ in ours.named_buffers()} == {"scale", "shift"}
    assert ours.load_state_dict({}) is not None  # its own (empty) state loads
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"hold VAE weights.*diffusers reference.*strict=False either"):
            ours.load_state_dict(ref_state, strict=strict)
    # nested in a user's module, under a prefix, too
    parent = nn.Module()
    parent.lpl = ours
    with pytest.raises(RuntimeError, match="'lpl.vae."):
        parent.load_state_dict({f"lpl.{k}": v for k, v in ref_state.items()}, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())  # nothing was loaded
    # what the message advises: the VAE's weights go into the VAE
    other = tiny_vae("sdxl_like", seed=7)
    other.load_state_dict({k[len("vae."):]: v for k, v in ref_state.items() if k.startswith("vae.")})
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_scale_and_shift_never_lose_precision_to_a_cast():
    vae = tiny_vae("shifted")
    lpl = LatentPerceptualLoss(vae, reference_compat=False).to(torch.float16).to(torch.float32)
    assert lpl.scale.dtype == torch.float64 and float(lpl.scale) == 1.5305 and float(lpl.shift) == 0.0609


# ---------------------------------------------------------------- done means: the reference trainer's call pattern

TRAINER_PATTERN = textwrap.dedent('''
    """The LPL part of diffusers' examples/research_projects/lpl/train_sdxl_lpl.py, verbatim
    in its calls: the constructor with the trainer's keywords, .to(accelerator.device),
    get_loss under accelerator.autocast(), .mean(), last_feature_stats for the logs."""
    import json, logging, sys
    import torch
    from accelerate import Accelerator

    sys.path.insert(0, sys.argv[1])
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    from lpl_loss import LatentPerceptualLoss  # the one-line shim
    from reference_lpl import ReferenceLPL, tiny_vae

    accelerator = Accelerator(cpu=True)
    vae = tiny_vae("sdxl_like", seed=11).requires_grad_(False)
    results = []
    for args in json.loads(sys.argv[2]):
        lpl_fn = LatentPerceptualLoss(
            vae=vae,
            loss_type=args["lpl_loss_type"],
            grad_ckpt=args["gradient_checkpointing"],
            pow_law=args["lpl_pow_law"],
            norm_type=args["lpl_norm_type"],
            num_mid_blocks=args["lpl_num_blocks"],
            feature_type="feature",
            remove_outliers=args["lpl_remove_outliers"],
        )
        lpl_fn.to(accelerator.device)
        ref_fn = ReferenceLPL(vae=vae, loss_type=args["lpl_loss_type"], grad_ckpt=args["gradient_checkpointing"],
                              pow_law=args["lpl_pow_law"], norm_type=args["lpl_norm_type"],
                              num_mid_blocks=args["lpl_num_blocks"], feature_type="feature",
                              remove_outliers=args["lpl_remove_outliers"])
        g = torch.Generator().manual_seed(len(results))
        for step in range(2):
            z0_masked = torch.randn(2, 4, 8, 8, generator=g)
            z0_hat_masked = (z0_masked + 0.2 * torch.randn(2, 4, 8, 8, generator=g)).requires_grad_(True)
            with accelerator.autocast():
                lpl_loss_value = lpl_fn.get_loss(z0_hat_masked, z0_masked)
                lpl_loss_value = lpl_loss_value.mean()
            (grad,) = torch.autograd.grad(lpl_loss_value, z0_hat_masked)
            stats = [[s["mean"], s["std"], s.get("outlier_ratio", 0.0)] for s in lpl_fn.last_feature_stats]
            ref_value = ref_fn.get_loss(z0_hat_masked, z0_masked).mean()
            (ref_grad,) = torch.autograd.grad(ref_value, z0_hat_masked)
            ref_stats = [[s["mean"], s["std"], s["outlier_ratio"]] for s in ref_fn.last_feature_stats]
            results.append({"loss": float(lpl_loss_value), "ref_loss": float(ref_value),
                            "grad": grad.flatten().tolist(), "ref_grad": ref_grad.flatten().tolist(),
                            "stats": stats, "ref_stats": ref_stats})
    print(json.dumps(results))
''')

TRAINER_ARGS = [
    dict(lpl_loss_type="mse", gradient_checkpointing=False, lpl_pow_law=True, lpl_norm_type="shared",
         lpl_num_blocks=4, lpl_remove_outliers=True),
    dict(lpl_loss_type="l1", gradient_checkpointing=True, lpl_pow_law=False, lpl_norm_type="default",
         lpl_num_blocks=4, lpl_remove_outliers=True),
    dict(lpl_loss_type="mse", gradient_checkpointing=True, lpl_pow_law=True, lpl_norm_type="batch",
         lpl_num_blocks=3, lpl_remove_outliers=False),
]


def run_trainer_pattern(tmp_path: Path, compat_env: bool):
    (tmp_path / "lpl_loss.py").write_text("from lpl_ext import LatentPerceptualLoss  # noqa: F401\n")
    script = tmp_path / "trainer_lpl_part.py"
    script.write_text(TRAINER_PATTERN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPL_EXT_")}
    if compat_env:
        env["LPL_EXT_REFERENCE_COMPAT"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(TESTS), json.dumps(TRAINER_ARGS)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("compat_env", [True, False], ids=["LPL_EXT_REFERENCE_COMPAT=1", "unset"])
def test_the_reference_trainer_pattern_through_the_shim(tmp_path, compat_env):
    """Done means: unchanged trainer calls, the one-line shim. With the variable: the
    reference's LPL loss (to ~1e-6), its gradient and statistics, and no notice. Without:
    the notice, exactly once in the process, and a loss that is indeed not the reference's."""
    results, stderr = run_trainer_pattern(tmp_path, compat_env)
    assert len(results) == 2 * len(TRAINER_ARGS)
    if compat_env:
        assert NOTICE not in stderr, stderr[-2000:]
        for r in results:
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
            assert_close_to_scale(torch.tensor(r["grad"]), torch.tensor(r["ref_grad"]), rtol=1e-5,
                                  what="latent gradient")
            assert_close_to_scale(torch.tensor(r["stats"]), torch.tensor(r["ref_stats"]), rtol=1e-5,
                                  what="feature statistics")
    else:
        assert stderr.count(NOTICE) == 1, stderr[-3000:]
        assert "post_quant_conv" in stderr and "WARNING - lpl_ext.lpl_loss" in stderr
        ratios = [r["loss"] / r["ref_loss"] for r in results]
        assert all(abs(q - 1.0) > 1e-3 for q in ratios), ratios
