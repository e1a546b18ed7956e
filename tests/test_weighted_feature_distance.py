"""The weighted feature distance (lpl_ext.weighted_feature_distance) and the fold of its
per-sample weights into the fused kernel's gradient (issue 23, "Backward without a second
pass where possible"; docs/api.md).

- ``_C.feature_distance(..., grad_scale=s)`` writes d(sum_n s[n] loss[n])/dx: compared
  with s[n] times the unscaled gradient over dtypes, norms, distances and masks (the loss
  is unchanged, bit for bit);
- the operator's total and gradient against autograd through the plain-PyTorch formula
  (tests/reference.py), float64 gradcheck, torch.compile;
- backward is one in-place product by the scalar upstream gradient, and no pass at all
  when that is 1 (``_C.scale_gradient`` leaves every bit, NaN payloads included);
- the objective reduces its layers through it (one call per layer), with the same loss
  and gradient as the unfolded formula.
The CUDA twins run on the emulated device in tests/test_cuda_emulated.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import lpl_ext
from lpl_ext import _C, _launch
from lpl_ext._options import DISTANCES, NORMS
from reference import ref_feature_distance
from test_cuda_emulated import STREAM, _on_device, assert_same_values, emu  # noqa: F401 (emu: a fixture)
from test_cuda_loader import FakeCudaArray
from tolerance import assert_close_to_scale

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# relative precision of the storage dtype: the folded product (coef * s) rounds once more
EPS = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _inputs(shape, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.rand(shape, generator=g) > 0.3) if masked else None
    return x, y, mask


def _kernel(x, y, mask, norm, distance, weight, grad_scale=None):
    loss = torch.empty(x.shape[0], dtype=torch.float64)
    grad = torch.empty_like(x)
    kwargs = {} if grad_scale is None else {"grad_scale": grad_scale}
    _C.feature_distance(x, y, mask, loss, grad, norm, distance, weight, **kwargs)
    return loss, grad


@pytest.mark.parametrize("dtype,norm,distance,masked",
                         list(itertools.product(DTYPES, NORMS, DISTANCES, [False, True])))
def test_folded_gradient_is_the_scaled_gradient(dtype, norm, distance, masked):
    x, y, mask = _inputs((3, 5, 7, 9), dtype, masked)
    scale = torch.tensor([0.25, -3.0, 0.0], dtype=torch.float64)  # a negative and a zero factor
    loss, grad = _kernel(x, y, mask, norm, distance, 0.5)
    loss_s, grad_s = _kernel(x, y, mask, norm, distance, 0.5, grad_scale=scale)
    assert torch.equal(loss_s, loss)  # the loss does not see the factors
    want = grad.double() * scale.view(-1, 1, 1, 1)
    # one more rounding of the plane coefficient, then the storage dtype's (twice for 16-bit)
    assert_close_to_scale(grad_s.double(), want, rtol=4 * EPS[dtype], floor=1e-300)
    assert torch.all(grad_s[2] == 0)


def test_grad_scale_arguments_are_checked():
    x, y, _ = _inputs((2, 3, 4, 4), torch.float32, False)
    loss = torch.empty(2, dtype=torch.float64)
    grad = torch.empty_like(x)
    with pytest.raises(ValueError, match="grad_scale: scales the gradient, but grad is None"):
        _C.feature_distance(x, y, None, loss, None, "none", "mse", 1.0, grad_scale=torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="grad_scale"):
        _C.feature_distance(x, y, None, loss, grad, "none", "mse", 1.0, grad_scale=torch.ones(2))
    with pytest.raises(ValueError, match="grad_scale"):
        _C.feature_distance(x, y, None, loss, grad, "none", "mse", 1.0, grad_scale=torch.ones(3, dtype=torch.float64))


# ---- the operator ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_total_and_gradient_match_autograd_of_the_formula(norm, dtype):
    x, y, mask = _inputs((4, 3, 6, 5), dtype, True, seed=1)
    w = torch.tensor([0.5, 2.0, 0.0, 1.25])
    xk = x.clone().requires_grad_(True)
    total, loss = lpl_ext.weighted_feature_distance(xk, y, mask, sample_weight=w, norm=norm, distance="mse",
                                                    weight=0.75)
    (3.0 * total).backward()  # an upstream gradient != 1: the in-place product
    assert total.dtype == torch.float32 and total.dim() == 0 and not loss.requires_grad
    x64 = x.double().requires_grad_(True)
    want_loss = ref_feature_distance(x64, y.double(), mask, norm, "mse", 0.75)
    want_total = (want_loss * w.double()).sum()
    (3.0 * want_total).backward()
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_to_scale(total.double(), want_total.detach(), rtol=rtol)
    assert_close_to_scale(loss.double(), want_loss.detach(), rtol=rtol)
    assert_close_to_scale(xk.grad.double(), x64.grad, rtol=rtol * 4)


def test_float64_gradcheck():
    x, y, mask = _inputs((2, 3, 4, 5), torch.float64, True, seed=2)
    w = torch.tensor([0.7, -1.5], dtype=torch.float64)
    for norm in NORMS:
        def f(xx):
            return lpl_ext.weighted_feature_distance(xx, y, mask, sample_weight=w, norm=norm, distance="mse",
                                                     reentrant=True)[0]
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_upstream_gradient_one_leaves_the_kept_gradient_untouched(monkeypatch):
    """With total.backward() (upstream 1), x.grad is the kernel's folded gradient itself:
    scale_gradient is called once and changes no bit."""
    x, y, mask = _inputs((2, 4, 5, 6), torch.float32, True, seed=3)
    w = torch.tensor([0.3, 1.7])
    calls = []
    real = _launch.scale_gradient

    def spy(grad, factor):
        before = grad.clone()
        out = real(grad, factor)
        calls.append((float(factor), torch.equal(out, before), out is grad))
        return out

    monkeypatch.setattr(_launch, "scale_gradient", spy)
    xk = x.clone().requires_grad_(True)
    total, _ = lpl_ext.weighted_feature_distance(xk, y, mask, sample_weight=w, norm="shared")
    total.backward()
    assert calls == [(1.0, True, True)]
    _, folded = _kernel(x, y, mask, "shared", "mse", 1.0, grad_scale=w.double())
    assert torch.equal(xk.grad, folded)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_gradient_skips_a_factor_of_one_bit_for_bit(dtype):
    g = torch.randn(2, 3, 4, 5).to(dtype)
    g.view(-1)[:3] = float("nan")
    bits = g.view(torch.int16 if g.element_size() == 2 else (torch.int32 if g.element_size() == 4 else torch.int64))
    before = bits.clone()
    _C.scale_gradient(g, torch.ones(1, dtype=torch.float64))
    assert torch.equal(bits, before)
    want = (g.float() * 0.5).to(dtype) if dtype != torch.float64 else g * 0.5
    _C.scale_gradient(g, torch.full((1,), 0.5, dtype=torch.float64))
    np.testing.assert_array_equal(torch.isnan(g).numpy(), torch.isnan(want).numpy())
    assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(want))


def test_scale_gradient_arguments_are_checked():
    g = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match="factor"):
        _C.scale_gradient(g, torch.ones(1))
    with pytest.raises(ValueError, match="factor"):
        _C.scale_gradient(g, torch.ones(2, dtype=torch.float64))


def test_sample_weight_is_checked():
    x, y, _ = _inputs((2, 3, 4, 4), torch.float32, False)
    with pytest.raises(ValueError, match=r"sample_weight: expected a floating \(2,\) tensor"):
        lpl_ext.weighted_feature_distance(x, y, sample_weight=torch.ones(3))
    with pytest.raises(TypeError, match="sample_weight: expected a torch.Tensor"):
        lpl_ext.weighted_feature_distance(x, y, sample_weight=[1.0, 2.0])
    with pytest.raises(TypeError, match="x: weighted_feature_distance takes torch tensors"):
        lpl_ext.weighted_feature_distance(x.numpy(), y.numpy(), sample_weight=torch.ones(2))


def test_compiled_matches_eager():
    x, y, mask = _inputs((2, 3, 6, 6), torch.float32, True, seed=4)
    w = torch.tensor([0.5, 1.5])

    def f(xx):
        total, loss = lpl_ext.weighted_feature_distance(xx, y, mask, sample_weight=w, norm="default")
        return 2.0 * total, loss

    xe = x.clone().requires_grad_(True)
    te, le = f(xe)
    te.backward()
    xc = x.clone().requires_grad_(True)
    tc, lc = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    tc.backward()
    assert_close_to_scale(tc, te.detach(), rtol=1e-6)
    assert_close_to_scale(lc, le, rtol=1e-6)
    assert_close_to_scale(xc.grad, xe.grad, rtol=1e-6)


# ---- the objective --------------------------------------------------------------------------------


@pytest.mark.parametrize("sync_free", [False, True])
def test_objective_folds_its_weights_once_per_layer(monkeypatch, sync_free):
    """LPLObjective reduces each layer through weighted_feature_distance, with the loss and
    gradient of the plain formula mean_n(w[n] * mean_l loss_l[n])."""
    from lpl_ext import lpl_loss
    from lpl_ext.demo.tiny_sdxl import build_tiny_vae

    torch.manual_seed(0)
    vae = build_tiny_vae(pretrained=False)
    objective = lpl_ext.LPLObjective(vae, scale=True, snr_gamma=5.0, t_threshold=None, sync_free=sync_free)
    calls = []
    real = lpl_loss.weighted_feature_distance
    monkeypatch.setattr(lpl_loss, "weighted_feature_distance",
                        lambda *a, **k: calls.append(k["sample_weight"].clone()) or real(*a, **k))
    latents = torch.randn(3, 4, 8, 8)
    noisy = torch.randn(3, 4, 8, 8)
    alphas = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([10, 400, 900])
    pred = torch.randn(3, 4, 8, 8, requires_grad=True)
    lpl, _ = objective(pred, noisy, latents, t, prediction_type="epsilon", alphas_cumprod=alphas)
    lpl.backward()
    assert len(calls) == objective.num_layers
    # the unfolded formula, through the same module
    pred2 = pred.detach().clone().requires_grad_(True)
    z0 = lpl_ext.predict_z0(pred2, noisy, t, prediction_type="epsilon", alphas_cumprod=alphas)
    layers = objective.loss.layer_losses(z0, latents)
    w = lpl_ext.snr_weights(t, 5.0, prediction_type="epsilon", alphas_cumprod=alphas)
    want = ((sum(layers) / len(layers)).float() * w).mean()
    want.backward()
    assert_close_to_scale(lpl, want.detach(), rtol=1e-5)
    assert_close_to_scale(pred.grad, pred2.grad, rtol=1e-4)


# ---- on the emulated device ------------------------------------------------------------------------



@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_scale_gradient_touches_nothing_for_one(emu, dtype):
    """The device tests the factor: with 1, every block reads it and nothing else, and no
    byte is written; with 0.5, one read and one write per element, as the CPU rounds."""
    g = torch.randn(2, 3, 40, 50).to(dtype)
    for factor in (1.0, 0.5):
        emu.clear()
        want = g.clone()
        dev_g = _on_device(g.clone())
        _C.scale_gradient(dev_g, FakeCudaArray(np.full(1, factor)), stream=STREAM, kernels=emu.kernels)
        _C.scale_gradient(want, torch.full((1,), factor, dtype=torch.float64))
        assert_same_values(dev_g.array, _on_device(want).array, dtype)
        (launch,) = [ln for ln in emu.launches() if ln["kind"] == "launch"]
        blocks, size = int(launch["grid"]), g.element_size()
        if factor == 1.0:
            assert (int(launch["read"]), int(launch["write"])) == (8 * blocks, 0)
        else:
            assert (int(launch["read"]), int(launch["write"])) == (8 * blocks + size * g.numel(), size * g.numel())
        emu.check_clean()


@pytest.mark.parametrize("norm", NORMS)
def test_emulated_folded_gradient_matches_cpu(emu, norm):
    """The v2 kernels fold grad_scale exactly as the CPU does; the 0.2 kernels refuse it
    (lpl_ext's launch layer then rescales in a second pass)."""
    x, y, mask = _inputs((2, 3, 9, 11), torch.float32, True, seed=5)
    scale = torch.tensor([0.75, -2.0], dtype=torch.float64)
    n, c = x.shape[:2]
    loss = FakeCudaArray(np.full(n, np.nan))
    grad = FakeCudaArray(np.zeros(tuple(x.shape), np.float32))
    ws = FakeCudaArray(np.full(_C.feature_distance_workspace(n, c), np.nan))
    emu.clear()
    call = lambda: _C.feature_distance(_on_device(x), _on_device(y), _on_device(mask), loss, grad, norm, "mse", 0.5,
                                       stream=STREAM, workspace=ws, kernels=emu.kernels,
                                       grad_scale=FakeCudaArray(scale.numpy()))
    if emu.kernel_set == "v1":
        with pytest.raises(RuntimeError, match="cannot fold it"):
            call()
        return
    call()
    want_loss, want_grad = _kernel(x, y, mask, norm, "mse", 0.5, grad_scale=scale)
    if norm == "batch":
        np.testing.assert_allclose(grad.array, want_grad.numpy(), rtol=8 * EPS[torch.float32],
                                   atol=8 * EPS[torch.float32] * float(want_grad.abs().max()))
    else:
        assert_same_values(grad.array, want_grad.numpy(), torch.float32)
    np.testing.assert_allclose(loss.array, want_loss.numpy(), rtol=1e-5)
    emu.check_clean()


def test_gradient_buffer_overlapping_an_input_is_refused():
    x, y, mask = _inputs((2, 3, 4, 4), torch.float32, True)
    loss = torch.empty(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad: overlaps x in memory"):
        _C.feature_distance(x, y, None, loss, x, "none", "mse", 1.0)
    both = torch.randn(2, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="grad: overlaps y in memory"):
        _C.feature_distance(x, both[1], None, loss, both[1], "none", "mse", 1.0)
