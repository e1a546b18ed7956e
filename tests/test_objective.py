"""lpl_ext.LPLObjective / predict_z0 / snr_weights: z0 recovery for every prediction type,
threshold, start step and SNR logic, logging tensors, host syncs, autocast, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

import lpl_ext
from lpl_ext import LatentPerceptualLoss, LPLObjective, predict_z0, snr_weights
from reference_lpl import blob_vae, tiny_vae
from tolerance import assert_close_to_scale
from test_lpl_loss import SyncCounter
from test_module_parity import LATENT_SEED, fixed_oracle

PRED_TYPES = ("epsilon", "v_prediction", "sample", "flow_matching")
LAYER_KEYS = ("loss", "mean", "std", "outlier_ratio")


@pytest.fixture(scope="module")
def vae():
    return tiny_vae("sdxl_like", seed=4)


@pytest.fixture(scope="module")
def scheduler():
    # SDXL's training schedule.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


def make_batch(scheduler, prediction_type, timesteps, *, seed=0, hw=4, perfect=True):
    """(model_pred, noisy_latents, latents, kwargs) with fp32 z_t built from z0 and noise."""
    g = torch.Generator().manual_seed(seed)
    n = len(timesteps)
    z0 = torch.randn(n, 4, hw, hw, generator=g)
    eps = torch.randn(n, 4, hw, hw, generator=g)
    t = torch.tensor(timesteps)
    kwargs = dict(prediction_type=prediction_type)
    if prediction_type == "flow_matching":
        sig = t.float() / 1000.0
        zt = (1 - sig.view(-1, 1, 1, 1)) * z0 + sig.view(-1, 1, 1, 1) * eps
        pred = eps - z0
        kwargs["sigmas"] = sig
    else:
        zt = scheduler.add_noise(z0, eps, t)
        pred = {"epsilon": eps, "v_prediction": scheduler.get_velocity(z0, eps, t), "sample": z0}[prediction_type]
        kwargs["alphas_cumprod"] = scheduler.alphas_cumprod
    if not perfect:
        pred = pred + 0.3 * torch.randn(pred.shape, generator=g)
    return pred.clone().requires_grad_(True), zt, z0, t, kwargs


def z0_float64(pred, zt, t, prediction_type, alphas_cumprod=None, sigmas=None):
    pred, zt = pred.double(), zt.double()
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow_matching":
        return zt - sigmas.double().view(-1, 1, 1, 1) * pred
    ac = alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (zt - (1 - ac).sqrt() * pred) / ac.sqrt()
    return ac.sqrt() * zt - (1 - ac).sqrt() * pred


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_perfect_prediction_recovers_z0_and_gives_zero_lpl(vae, scheduler, prediction_type):
    pred, zt, z0, t, kw = make_batch(scheduler, prediction_type, [5, 60, 120, 199])
    z0_hat = predict_z0(pred, zt, t, **kw)
    assert z0_hat.dtype == torch.float32
    torch.testing.assert_close(z0_hat, z0, rtol=0, atol=2e-6)
    obj = LPLObjective(vae, t_threshold=200)
    lpl, logs = obj(pred, zt, z0, t, **kw)
    bad_pred = make_batch(scheduler, prediction_type, [5, 60, 120, 199], perfect=False)[0]
    lpl_bad, _ = obj(bad_pred, zt, z0, t, **kw)
    assert lpl.dim() == 0 and lpl.dtype == torch.float32
    # fp32 round-off only: ~1e-13 against ~1e-2 for a 0.3-sigma error.
    assert lpl.item() < 1e-7 * lpl_bad.item()
    assert float(logs["lpl_num_samples"]) == 4 and float(logs["lpl_applied_ratio"]) == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_matching"])
def test_z0_hat_is_computed_in_fp32_from_low_precision_predictions(scheduler, prediction_type):
    pred, zt, _, t, kw = make_batch(scheduler, prediction_type, [3, 150, 900], perfect=False)
    pred16 = pred.detach().to(torch.bfloat16)
    got = predict_z0(pred16, zt, t, **kw)
    want = z0_float64(pred16, zt, t, prediction_type, kw.get("alphas_cumprod"), kw.get("sigmas"))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # The reference's route (z_t cast to the training dtype first) is measurably worse.
    lossy = z0_float64(pred16, zt.to(torch.bfloat16), t, prediction_type, kw.get("alphas_cumprod"),
                       kw.get("sigmas"))
    assert (lossy - want).abs().max() > 100 * (got.double() - want).abs().max()


def _decoder_calls(vae):
    calls = []
    hook = vae.decoder.conv_in.register_forward_hook(lambda *a: calls.append(1))
    return calls, hook


def test_threshold_selects_samples_and_logs(vae, scheduler):
    steps = [10, 500, 150, 999, 199, 200]
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", steps, perfect=False, seed=3)
    obj = LPLObjective(vae, t_threshold=200)
    lpl, logs = obj(pred, zt, z0, t, **kw)
    chosen = torch.tensor([0, 2, 4])
    z0_hat = predict_z0(pred[chosen], zt[chosen], t[chosen], **kw)
    plain = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True)
    hist = plain.get_loss(z0_hat, z0[chosen], get_hist=True)
    assert_close_to_scale(lpl, (sum(hist) / len(hist)).mean(), rtol=1e-6)
    assert float(logs["lpl_num_samples"]) == 3
    assert float(logs["lpl_applied_ratio"]) == pytest.approx(0.5)
    torch.testing.assert_close(logs["lpl_loss"], lpl.detach())
    for i, layer in enumerate(hist):
        assert_close_to_scale(logs[f"lpl_layer{i}_loss"], layer.mean(), rtol=1e-6)
        for key in ("mean", "std", "outlier_ratio"):
            torch.testing.assert_close(logs[f"lpl_layer{i}_{key}"], plain.last_feature_stats_tensors[i][key])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())
    # Only the selected samples receive a gradient.
    lpl.backward()
    assert pred.grad[[1, 3, 5]].abs().sum() == 0 and pred.grad[chosen].abs().sum() > 0


def _expected_keys(num_layers=5):
    keys = {"lpl_loss", "lpl_applied_ratio", "lpl_num_samples"}
    keys |= {f"lpl_layer{i}_{k}" for i in range(num_layers) for k in LAYER_KEYS}
    return keys


def test_no_sample_below_threshold_gives_a_differentiable_zero(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "v_prediction", [300, 999], perfect=False)
    obj = LPLObjective(vae, t_threshold=200)
    calls, hook = _decoder_calls(vae)
    try:
        lpl, logs = obj(pred, zt, z0, t, **kw)
    finally:
        hook.remove()
    assert calls == [] and lpl.item() == 0.0 and lpl.dtype == torch.float32
    lpl.backward()  # connected to the graph, zero gradient
    assert pred.grad.abs().sum() == 0
    assert set(logs) == _expected_keys()
    assert float(logs["lpl_applied_ratio"]) == 0.0 and float(logs["lpl_num_samples"]) == 0.0


def test_start_step(vae, scheduler):
    """The reference raises UnboundLocalError for --lpl_start > 0; here: 0 before it, no
    decoder pass and no host sync; the normal term from it on."""
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", [20, 40], perfect=False)
    obj = LPLObjective(vae, t_threshold=200, start_step=10)
    calls, hook = _decoder_calls(vae)
    try:
        with SyncCounter() as counter:
            before, logs_before = obj(pred, zt, z0, t, global_step=9, **kw)
        after, logs_after = obj(pred, zt, z0, t, global_step=10, **kw)
    finally:
        hook.remove()
    assert counter.ours() == [] and before.item() == 0.0 and len(calls) == 2  # target + prediction
    assert after.item() > 0 and set(logs_before) == set(logs_after) == _expected_keys()
    assert float(logs_before["lpl_applied_ratio"]) == 0.0


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_snr_scaling_uses_the_selected_samples(vae, scheduler, prediction_type):
    """Weights of the selected samples only (the reference indexes a masked SNR again)."""
    steps = [700, 15, 400, 90, 180, 650]
    pred, zt, z0, t, kw = make_batch(scheduler, prediction_type, steps, perfect=False, seed=5)
    gamma = 5.0
    obj = LPLObjective(vae, t_threshold=200, snr_gamma=gamma, scale=True)
    plain = LPLObjective(vae, t_threshold=200)
    lpl, _ = obj(pred, zt, z0, t, **kw)
    chosen = torch.tensor([1, 3, 4])
    sub_kw = dict(kw)
    if "sigmas" in kw:
        sub_kw["sigmas"] = kw["sigmas"][chosen]
    per_sample = [plain(pred[i:i + 1], zt[i:i + 1], z0[i:i + 1], t[i:i + 1],
                        **{**kw, **({"sigmas": kw["sigmas"][i:i + 1]} if "sigmas" in kw else {})})[0]
                  for i in chosen.tolist()]
    tt = t[chosen].double()
    if prediction_type == "flow_matching":
        s = tt / 1000.0
        snr = ((1 - s) / s) ** 2
        w = snr.clamp(max=gamma) * s * s
    else:
        ac = scheduler.alphas_cumprod.double()[t[chosen]]
        snr = ac / (1 - ac)
        w = snr.clamp(max=gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[
            prediction_type]
    want = (torch.stack(per_sample).double() * w).mean()
    assert_close_to_scale(lpl.double(), want, rtol=1e-5)
    got_w = snr_weights(t[chosen], gamma, **sub_kw)
    assert_close_to_scale(got_w.double(), w, rtol=1e-5)


def test_scale_without_snr_gamma_is_an_error(vae):
    with pytest.raises(ValueError, match="scale"):
        LPLObjective(vae, scale=True)


def test_one_host_sync_per_call(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", [10, 500, 20], perfect=False)
    obj = LPLObjective(vae, t_threshold=200, snr_gamma=5.0, scale=True)
    with SyncCounter() as counter:
        lpl, logs = obj(pred, zt, z0, t, **kw)
        lpl.backward()
    assert counter.ours() == [("nonzero", "objective.py")]
    everything = LPLObjective(vae, t_threshold=None)
    with SyncCounter() as counter:
        lpl, logs = everything(pred, zt, z0, t, **kw)
    assert counter.ours() == [] and float(logs["lpl_applied_ratio"]) == 1.0


def test_autocast_bf16_on_cpu(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "v_prediction", [10, 100], perfect=False)
    want, _ = LPLObjective(vae)(pred, zt, z0, t, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_decoder, logs = LPLObjective(vae)(pred.bfloat16(), zt, z0, t, **kw)
        bf16_decoder, _ = LPLObjective(vae, decoder_fp32=False)(pred, zt, z0, t, **kw)
    assert fp32_decoder.dtype == bf16_decoder.dtype == torch.float32
    # decoder_fp32 (the default): the fp32 result up to the bf16 rounding of the prediction.
    assert_close_to_scale(fp32_decoder, want, rtol=2e-2)
    assert_close_to_scale(bf16_decoder, want, rtol=0.1)
    bf16_decoder.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_vae_stays_out_of_the_module_tree(vae):
    obj = LPLObjective(vae)
    assert list(obj.parameters()) == [] and obj.state_dict() == {}
    assert obj.num_layers == 5
    assert lpl_ext.LPLObjective is LPLObjective


def test_flow_matching_sigmas_may_be_broadcast_shaped(vae, scheduler):
    pred, zt, z0, t, kw = make_batch(scheduler, "flow_matching", [50, 150], perfect=False)
    a, _ = LPLObjective(vae)(pred, zt, z0, t, **kw)
    kw4 = dict(kw, sigmas=kw["sigmas"].view(-1, 1, 1, 1))
    b, _ = LPLObjective(vae)(pred, zt, z0, t, **kw4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("change,arg", [
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(alphas_cumprod=None), "alphas_cumprod"),
    (dict(prediction_type="flow_matching"), "sigmas"),
    (dict(prediction_type="flow_matching", sigmas=torch.rand(3)), "sigmas"),
])
def test_bad_calls_name_the_argument(vae, scheduler, change, arg):
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", [10, 20], perfect=False)
    with pytest.raises(ValueError, match=arg):
        LPLObjective(vae)(pred, zt, z0, t, **{**kw, **change})
    with pytest.raises(ValueError, match="latents"):
        LPLObjective(vae)(pred, zt, z0[:1], t, **kw)


def test_lpl_and_logs_match_the_oracle_with_real_outliers(scheduler):
    """The whole objective on a VAE whose outlier removal really removes pixels (blob
    artifacts on layers 2-4): the SNR-weighted LPL of the selected samples and every
    per-layer log against float64 z0_hat and SNR weights and the spec's mask and distance
    on the decoder's own blocks."""
    vae = blob_vae("sdxl_like", dtype=torch.float32)
    g = torch.Generator().manual_seed(LATENT_SEED)
    blobby = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).float()  # targets with blobs
    other = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(99))
    z0 = torch.stack([blobby[0], other[0], blobby[1], other[1]])
    eps = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([40, 600, 170, 900])
    zt = scheduler.add_noise(z0, eps, t)
    pred = (eps + 0.3 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(8))).requires_grad_(True)
    gamma = 5.0
    obj = LPLObjective(vae, t_threshold=200, snr_gamma=gamma, scale=True)
    lpl, logs = obj(pred, zt, z0, t, prediction_type="epsilon", alphas_cumprod=scheduler.alphas_cumprod)

    sel = torch.tensor([0, 2])
    z0_hat = z0_float64(pred.detach()[sel], zt[sel], t[sel], "epsilon", scheduler.alphas_cumprod)
    layers = fixed_oracle(vae, z0_hat.float(), z0[sel], num_blocks=4, norm="shared", loss_type="mse",
                          pow_law=True, remove_outliers=True)
    ac = scheduler.alphas_cumprod.double()[t[sel]]
    snr = ac / (1 - ac)
    per_sample = sum(layer["loss"].detach() for layer in layers) / len(layers)
    want = (per_sample * snr.clamp(max=gamma) / snr).mean()
    # z0_hat - z0 is small next to z0 here: fp32 z0_hat and SNR (the objective) against
    # float64 ones (the oracle) differ by ~5e-5 in the loss
    assert_close_to_scale(lpl.double(), want, rtol=2e-4)
    assert float(logs["lpl_num_samples"]) == 2 and float(logs["lpl_applied_ratio"]) == 0.5
    for i, layer in enumerate(layers):
        assert_close_to_scale(logs[f"lpl_layer{i}_loss"].double(), layer["loss"].detach().mean(), rtol=2e-4)
        for key in ("mean", "std", "outlier_ratio"):
            assert float(logs[f"lpl_layer{i}_{key}"]) == pytest.approx(layer["stats"][key], rel=1e-5, abs=1e-7)
        if i >= 2:  # the masked layers do lose pixels
            assert float(logs[f"lpl_layer{i}_outlier_ratio"]) > 0.008
