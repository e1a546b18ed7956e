"""torch.compile over lpl_ext: the kernels trace without a graph break
(``fullgraph=True``), and a training step around ``LatentPerceptualLoss.get_loss`` and
around the sync-free ``LPLObjective`` compiles whole and gives eager's values and
gradients.

Backends: the op-level test uses the default inductor backend; the decoder-sized steps use
``aot_eager`` (Dynamo's full-graph capture plus AOTAutograd over the operators' fake and
autograd registrations, which is what fullgraph compilation needs from lpl_ext) because
inductor's C++ code generation for a whole VAE decoder takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch

import lpl_ext
from lpl_ext import LatentPerceptualLoss, LPLObjective
from reference_lpl import tiny_vae
from tolerance import assert_close_to_scale

CUDA = lpl_ext.build_info()["cuda_available"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def head(x, y, weight):
    """Outlier mask + feature distance of two layers, as get_loss chains them."""
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    a = lpl_ext.feature_distance(x, y, keep, norm="shared", weight=weight)
    b = lpl_ext.feature_distance(x * 2, y, None, norm="default", distance="l1", weight=0.5)
    return (a * torch.tensor([0.5, 2.0], device=x.device) + b).sum(), stats.outlier_ratio


def head_inputs(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 12, 12, generator=g)
    y = x + 0.3 * torch.randn(2, 6, 12, 12, generator=g)
    y[1, 2, 3, 4] = 30.0
    return x.to(device).requires_grad_(True), y.to(device)


def test_kernels_compile_fullgraph_with_inductor():
    x, y = head_inputs()
    want, want_ratio = head(x, y, 0.25)
    (g_want,) = torch.autograd.grad(want, x)
    compiled = torch.compile(head, fullgraph=True)
    got, got_ratio = compiled(x, y, 0.25)
    (g_got,) = torch.autograd.grad(got, x)
    assert_close_to_scale(got, want, rtol=1e-6)
    torch.testing.assert_close(got_ratio, want_ratio, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)
    # The layer weight is a Python float argument of the compiled function: validated
    # without a data-dependent branch, and a new value gives the new loss.
    got, _ = compiled(x, y, 0.125)
    assert_close_to_scale(got, head(x, y, 0.125)[0], rtol=1e-6)
    assert not torch.allclose(got, want)
    explanation = torch._dynamo.explain(head)(x, y, 0.25)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def moments_head(x, y):
    """The masked layer as the loss module runs it: the outlier mask's plane moments handed
    to the feature distance (batch, weighted too)."""
    keep, stats, moments = lpl_ext.outlier_mask(y, return_stats=True, return_plane_moments=True)
    a = lpl_ext.feature_distance(x, y, keep, norm="batch", plane_moments=moments)
    total, _ = lpl_ext.weighted_feature_distance(x, y, keep, sample_weight=torch.tensor([0.5, 2.0]), norm="shared",
                                                 plane_moments=moments)
    return a.sum() + total, stats.outlier_ratio


def test_plane_moments_compile_fullgraph():
    x, y = head_inputs(seed=3)
    want, want_ratio = moments_head(x, y)
    (g_want,) = torch.autograd.grad(want, x)
    got, got_ratio = torch.compile(moments_head, fullgraph=True)(x, y)
    (g_got,) = torch.autograd.grad(got, x)
    assert_close_to_scale(got, want, rtol=1e-6)
    torch.testing.assert_close(got_ratio, want_ratio, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)
    explanation = torch._dynamo.explain(moments_head)(x, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_non_finite_weight_is_still_rejected_under_compile():
    x, y = head_inputs()
    with pytest.raises(Exception, match="weight: must be finite"):
        torch.compile(head, fullgraph=True, backend="aot_eager")(x, y, float("inf"))


def tiny_step_inputs(vae, n=2, hw=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    z = torch.randn(n, c, hw, hw, generator=g)
    target = z + 0.5 * torch.randn(n, c, hw, hw, generator=g)
    return z, target


@pytest.mark.slow
def test_training_step_with_get_loss_compiles_fullgraph_and_matches_eager():
    """The acceptance test: a tiny 'UNet' (a conv) trained through get_loss."""
    vae = tiny_vae("sdxl_like", seed=3)
    lpl = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True, remove_outliers=True, grad_ckpt=True)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 3, padding=1)
    z, target = tiny_step_inputs(vae)

    def step(z, target):
        pred = model(z)
        per_sample = lpl.get_loss(pred, target)
        return (per_sample * torch.tensor([1.0, 0.5])).sum()

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(z, target)
        loss.backward()
        stats = [dict(s) for s in lpl.last_feature_stats_tensors]
        return loss.detach(), [p.grad.clone() for p in model.parameters()], stats

    loss_e, grads_e, stats_e = run(step)
    loss_c, grads_c, stats_c = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    assert_close_to_scale(loss_c, loss_e, rtol=1e-6)
    for gc_, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc_, ge, rtol=1e-5, atol=1e-9)
    assert float(loss_e) > 0 and all(g.abs().sum() > 0 for g in grads_e)
    assert len(stats_c) == len(stats_e) == 5
    for sc, se in zip(stats_c, stats_e):
        for key in se:
            torch.testing.assert_close(sc[key], se[key], rtol=1e-6, atol=1e-9)
    # The caller's VAE was neither frozen nor trained by the loss.
    assert all(p.requires_grad and p.grad is None for p in vae.parameters())


@pytest.mark.slow
def test_sync_free_objective_compiles_fullgraph_and_matches_the_default():
    vae = tiny_vae("sdxl_like", seed=4)
    vae.requires_grad_(False)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 3, padding=1)
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    z0, _ = tiny_step_inputs(vae, n=4, seed=5)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([30, 700, 150, 990])
    a = ac[t].sqrt().float().view(-1, 1, 1, 1)
    zt = a * z0 + (1 - a * a).sqrt() * noise
    kwargs = dict(num_blocks=2, t_threshold=200, snr_gamma=5.0, scale=True)

    def make_step(objective):
        def step(zt, z0, t):
            lpl, logs = objective(model(zt), zt, z0, t, prediction_type="epsilon", alphas_cumprod=ac)
            return lpl, logs["lpl_num_samples"]
        return step

    results = []
    for obj, compile_it in ((LPLObjective(vae, **kwargs), False),
                            (LPLObjective(vae, sync_free=True, **kwargs), False),
                            (LPLObjective(vae, sync_free=True, capacity=2, **kwargs), True)):
        fn = make_step(obj)
        if compile_it:
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        model.zero_grad(set_to_none=True)
        lpl, count = fn(zt, z0, t)
        lpl.backward()
        results.append((lpl.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (want, n_want, g_want) = results[0]
    assert float(n_want) == 2 and float(want) > 0
    for got, n_got, g_got in results[1:]:
        assert float(n_got) == 2
        assert_close_to_scale(got, want, rtol=1e-5)
        for a_, b_ in zip(g_got, g_want):
            torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-8)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of lpl_ext")
def test_cuda_graphs_through_reduce_overhead():
    """mode='reduce-overhead' records the compiled head into CUDA graphs: replays must
    give eager's values and gradients (no host sync or allocation outside torch's
    allocator inside the kernels' launch path)."""
    x, y = head_inputs("cuda")
    want, _ = head(x, y, 0.25)
    (g_want,) = torch.autograd.grad(want, x)
    compiled = torch.compile(head, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        got, _ = compiled(x, y, 0.25)
        (g_got,) = torch.autograd.grad(got, x)
        assert_close_to_scale(got, want, rtol=1e-5)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-8)
