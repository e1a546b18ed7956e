"""LPLObjective(sync_free=True): no host sync, a fixed decoder batch (the whole batch or
``capacity`` slots), and the same loss and gradients as the default selection whenever
every qualifying sample fits.

Oracle: the default (host-synchronising) objective on the same batch, itself checked
against LatentPerceptualLoss on the selected samples in tests/test_objective.py.
"""

from __future__ import annotations

import pytest
import torch

from lpl_ext import LPLObjective
from reference_lpl import tiny_vae
from tolerance import assert_close_to_scale
from test_lpl_loss import SyncCounter
from test_objective import make_batch


@pytest.fixture(scope="module")
def vae():
    return tiny_vae("sdxl_like", seed=4).requires_grad_(False)


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


def decoder_batch_sizes(vae):
    sizes = []
    hook = vae.decoder.conv_in.register_forward_hook(lambda m, a, out: sizes.append(out.shape[0]))
    return sizes, hook


def run(obj, pred, zt, z0, t, kw):
    pred = pred.detach().clone().requires_grad_(True)
    lpl, logs = obj(pred, zt, z0, t, **kw)
    lpl.backward()
    return lpl.detach(), logs, pred.grad


OPTS = [dict(), dict(snr_gamma=5.0, scale=True), dict(norm_type="default", loss_type="l1", pow_law=False)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_matching"])
@pytest.mark.parametrize("opts", OPTS)
def test_whole_batch_mode_equals_the_default_without_a_sync(vae, scheduler, prediction_type, opts):
    steps = [700, 15, 400, 90, 180, 999]
    pred, zt, z0, t, kw = make_batch(scheduler, prediction_type, steps, perfect=False, seed=2)
    want, want_logs, want_grad = run(LPLObjective(vae, t_threshold=200, **opts), pred, zt, z0, t, kw)
    sizes, hook = decoder_batch_sizes(vae)
    try:
        with SyncCounter() as counter:
            got, logs, grad = run(LPLObjective(vae, t_threshold=200, sync_free=True, **opts), pred, zt, z0, t, kw)
    finally:
        hook.remove()
    assert counter.ours() == []  # no host sync anywhere in the objective or the loss
    assert sizes == [6, 6]  # target and prediction passes over the whole batch
    assert_close_to_scale(got, want, rtol=1e-5)
    # l1's gradient is sign(d): the decoder runs on 6 samples here and on the 3 below the
    # threshold there, so float32 features differ in their last bits and a d within rounding
    # of 0 may flip sign (seen: 1.4e-4 of the largest gradient); mse is smooth: 1e-7
    scale = 1e-3 if opts.get("loss_type") == "l1" else 1e-7
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=scale * float(want_grad.abs().max()))
    assert torch.equal(grad[[0, 2, 5]], torch.zeros_like(grad[[0, 2, 5]]))  # exactly 0 above the threshold
    assert set(logs) == set(want_logs)
    for key in ("lpl_loss", "lpl_applied_ratio", "lpl_num_samples") + tuple(
            f"lpl_layer{i}_loss" for i in range(5)):
        torch.testing.assert_close(logs[key], want_logs[key], rtol=1e-5, atol=1e-9)
    assert float(logs["lpl_num_samples"]) == 3 and all(v.dim() == 0 for v in logs.values())


def test_capacity_decodes_a_fixed_batch_of_the_first_qualifying_samples(vae, scheduler):
    steps = [700, 15, 400, 90, 180, 999]
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", steps, perfect=False, seed=3)
    want, want_logs, want_grad = run(LPLObjective(vae, t_threshold=200), pred, zt, z0, t, kw)
    # Capacity 4 >= the 3 qualifying samples: the default's result, 4 samples decoded.
    sizes, hook = decoder_batch_sizes(vae)
    try:
        with SyncCounter() as counter:
            got, logs, grad = run(LPLObjective(vae, t_threshold=200, sync_free=True, capacity=4),
                                  pred, zt, z0, t, kw)
    finally:
        hook.remove()
    assert counter.ours() == [] and sizes == [4, 4]
    assert_close_to_scale(got, want, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7 * float(want_grad.abs().max()))
    # Capacity 2 < 3: the first two qualifying samples in batch order (1 and 3) this step.
    got2, logs2, grad2 = run(LPLObjective(vae, t_threshold=200, sync_free=True, capacity=2), pred, zt, z0, t, kw)
    sub = [1, 3]
    want2, _, want_grad2 = run(LPLObjective(vae, t_threshold=200), pred[sub], zt[sub], z0[sub], t[sub], kw)
    assert_close_to_scale(got2, want2, rtol=1e-5)
    torch.testing.assert_close(grad2[sub], want_grad2, rtol=1e-4, atol=1e-7 * float(want_grad2.abs().max()))
    assert torch.equal(grad2[[0, 2, 4, 5]], torch.zeros_like(grad2[[0, 2, 4, 5]]))
    assert float(logs2["lpl_num_samples"]) == 2 and float(logs2["lpl_applied_ratio"]) == pytest.approx(2 / 6)


def test_no_qualifying_sample_gives_a_differentiable_zero(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "v_prediction", [300, 999, 450], perfect=False)
    for capacity in (None, 2):
        got, logs, grad = run(LPLObjective(vae, t_threshold=200, sync_free=True, capacity=capacity),
                              pred, zt, z0, t, kw)
        assert got.item() == 0.0 and got.dtype == torch.float32
        assert torch.equal(grad, torch.zeros_like(grad))
        assert float(logs["lpl_num_samples"]) == 0 and float(logs["lpl_applied_ratio"]) == 0
        assert all(float(logs[f"lpl_layer{i}_loss"]) == 0 for i in range(5))


def test_a_non_finite_unselected_sample_cannot_poison_the_step(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", [10, 990, 120], perfect=False, seed=4)
    bad = pred.detach().clone()
    bad[1] = float("inf")  # above the threshold: the default never decodes it
    want, _, want_grad = run(LPLObjective(vae, t_threshold=200), bad, zt, z0, t, kw)
    got, _, grad = run(LPLObjective(vae, t_threshold=200, sync_free=True), bad, zt, z0, t, kw)
    assert torch.isfinite(got) and torch.isfinite(grad).all()
    assert_close_to_scale(got, want, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7 * float(want_grad.abs().max()))


def test_no_threshold_and_start_step(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", [10, 990], perfect=False, seed=6)
    want, _, _ = run(LPLObjective(vae, t_threshold=None), pred, zt, z0, t, kw)
    got, logs, _ = run(LPLObjective(vae, t_threshold=None, sync_free=True), pred, zt, z0, t, kw)
    assert_close_to_scale(got, want, rtol=1e-6)
    assert float(logs["lpl_applied_ratio"]) == 1.0
    early = LPLObjective(vae, sync_free=True, start_step=5)
    lpl, _ = early(pred, zt, z0, t, global_step=4, **kw)
    assert lpl.item() == 0.0


@pytest.mark.parametrize("kwargs,exc,arg", [
    (dict(capacity=2), ValueError, "capacity"),  # without sync_free
    (dict(sync_free=True, capacity=0), ValueError, "capacity"),
    (dict(sync_free=True, capacity=2.0), TypeError, "capacity"),
    (dict(sync_free=1), TypeError, "sync_free"),
])
def test_bad_options_name_the_argument(vae, kwargs, exc, arg):
    with pytest.raises(exc, match=arg):
        LPLObjective(vae, **kwargs)
