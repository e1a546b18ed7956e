"""lpl_ext's plain-PyTorch backend (lpl_ext/_torch_backend.py) and the backend choice
(LPL_EXT_BACKEND, lpl_ext/_backend.py), on the CPU by forcing the fallback.

Oracle: the C kernels themselves, over the kernel tests' grids (tests/test_feature_distance.py,
tests/test_outlier_mask.py): every dtype, norm, distance, with and without a mask, odd
shapes, C = 1, non-contiguous inputs, grad_output != 1. Masks are compared bit for bit;
losses and gradients at the size of a reordered sum (docs/spec.md, "CPU and GPU agree").
Then the whole loss module and the objective with LPL_EXT_BACKEND=torch, against the
module-parity oracles and the public reference's recorded outputs
(tests/test_module_parity.py), and the device rules: a device without kernels falls back
with one warning, a ROCm build's CUDA tensors are refused by the kernels, and no float64
is made on a device without it.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lpl_ext
import test_module_parity as parity
from lpl_ext import LatentPerceptualLoss, LPLObjective, _backend, _torch_backend
from reference_lpl import blob_vae, tiny_vae
from test_feature_distance import (DISTANCES, NON_CONTIGUOUS_LAYOUTS, NORMS, SHAPES, make_inputs,
                                   non_contiguous_inputs)
from test_outlier_mask import DTYPES, KINDS, SMALL_SHAPES, WINDOWS, assert_same_mask, make_features
from tolerance import assert_close_to_scale

pytestmark = pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")

# Reordered sums: float64 results agree to ~1e-16 of their scale (measured <= 8e-16), float32
# to ~1e-7 (measured <= 2e-7); 16-bit results are rounded to the dtype after that, so they
# may differ by one step of the dtype.
RTOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2 * 2.0 ** -10, torch.bfloat16: 2 * 2.0 ** -7}


class Counter:
    """Counts the plain-PyTorch backend's calls; the C entry points raise if reached."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, forbid_kernels: bool = True) -> None:
        self.calls = {"feature_distance": 0, "outlier_mask": 0}
        for name in self.calls:
            real = getattr(_torch_backend, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                self.calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(_torch_backend, name, counted)
            if forbid_kernels:
                def refuse(*args, _name=name, **kwargs):
                    raise AssertionError(f"the C kernel {_name} ran under the torch backend")

                monkeypatch.setattr(lpl_ext._C, name, refuse)


def both_backends(monkeypatch, fn):
    """fn() with the kernels, then with LPL_EXT_BACKEND=torch (kernels forbidden)."""
    monkeypatch.delenv("LPL_EXT_BACKEND", raising=False)
    native = fn()
    with monkeypatch.context() as m:
        m.setenv("LPL_EXT_BACKEND", "torch")
        counter = Counter(m)
        fallback = fn()
        assert sum(counter.calls.values()) > 0
    return native, fallback


def distance_and_grad(x, y, mask, norm, distance, weight, grad_out):
    xa = x.detach().clone().requires_grad_(True)
    loss = lpl_ext.feature_distance(xa, y, mask, norm=norm, distance=distance, weight=weight)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), xa.grad


def assert_same_to_reduction_order(native, fallback, dtype, what=""):
    assert fallback.dtype == native.dtype and fallback.shape == native.shape
    assert torch.equal(torch.isnan(fallback), torch.isnan(native)), f"{what}: NaN pattern"
    finite = ~torch.isnan(native)
    assert_close_to_scale(fallback[finite].double(), native[finite].double(), rtol=RTOL[dtype], what=what)


# ---------------------------------------------------------------- feature distance grid

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_feature_distance_float64_grid(monkeypatch, shape, norm, distance, masked):
    x, y, mask = make_inputs(shape, masked=masked, seed=zlib.crc32(repr((shape, norm, distance)).encode()) % 1000)
    grad_out = torch.linspace(-1.5, 2.0, shape[0], dtype=torch.float64)
    (loss_n, grad_n), (loss_t, grad_t) = both_backends(
        monkeypatch, lambda: distance_and_grad(x, y, mask, norm, distance, 0.25, grad_out))
    assert_same_to_reduction_order(loss_n, loss_t, torch.float64, "loss")
    assert_same_to_reduction_order(grad_n, grad_t, torch.float64, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", [(2, 7, 33, 17), (1, 64, 32, 32), (3, 1, 20, 9)], ids=["small", "c64", "c1"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_feature_distance_low_precision_grid(monkeypatch, dtype, norm, distance, shape, masked):
    x, y, mask = make_inputs(shape, dtype=dtype, masked=masked, seed=11)
    grad_out = torch.tensor([1.0, -0.5, 3.0][: shape[0]])
    (loss_n, grad_n), (loss_t, grad_t) = both_backends(
        monkeypatch, lambda: distance_and_grad(x, y, mask, norm, distance, 0.5, grad_out))
    assert loss_t.dtype == grad_t.dtype == dtype
    assert_same_to_reduction_order(loss_n, loss_t, dtype, "loss")
    assert_same_to_reduction_order(grad_n, grad_t, dtype, "gradient")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
def test_feature_distance_non_contiguous(monkeypatch, norm, distance, layout):
    x, y, m = non_contiguous_inputs(layout)
    grad_out = torch.tensor([0.5, -2.0], dtype=torch.float64)
    (loss_n, grad_n), (loss_t, grad_t) = both_backends(
        monkeypatch, lambda: distance_and_grad(x, y, m, norm, distance, 1.0, grad_out))
    assert_same_to_reduction_order(loss_n, loss_t, torch.float64, "loss")
    assert_same_to_reduction_order(grad_n, grad_t, torch.float64, "gradient")
    assert grad_t.shape == x.shape


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_feature_distance_gradcheck(monkeypatch, norm, distance, masked):
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    Counter(monkeypatch)
    x, y, mask = make_inputs((2, 3, 4, 5), masked=masked, seed=100)
    x.requires_grad_(True)
    fn = lambda inp: lpl_ext.feature_distance(  # noqa: E731
        inp, y, mask, norm=norm, distance=distance, weight=0.75, reentrant=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_feature_distance_edge_cases(monkeypatch, dtype):
    """Exact zero at x = y*keep, an empty plane adds 0 with zero gradient, garbage under
    the mask is ignored, a NaN prediction stays visible, empty shapes."""
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    Counter(monkeypatch)
    x, y, mask = make_inputs((2, 4, 7, 7), dtype=dtype, masked=True, seed=2)
    mask[0, 1] = False
    for norm in NORMS:
        for distance in DISTANCES:
            target = torch.where(mask, y, torch.zeros((), dtype=dtype))
            xz = target.clone().requires_grad_(True)
            loss = lpl_ext.feature_distance(xz, y, mask, norm=norm, distance=distance)
            loss.sum().backward()
            assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(xz.grad, torch.zeros_like(xz))
            dirty = torch.where(mask, y, torch.full((), math.nan, dtype=dtype))
            xg = x.clone().requires_grad_(True)
            clean = lpl_ext.feature_distance(xg, y, mask, norm=norm, distance=distance)
            clean.sum().backward()
            assert torch.isfinite(clean).all() and torch.isfinite(xg.grad).all()
            if norm != "default":  # default couples the channels through ||x||
                assert float(xg.grad[0, 1].abs().max()) == 0.0
            assert torch.equal(lpl_ext.feature_distance(x, dirty, mask, norm=norm, distance=distance), clean.detach())
    bad = x.clone()
    bad[1, 0, 0, 0] = math.nan
    loss = lpl_ext.feature_distance(bad, y, mask, norm="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
    assert lpl_ext.feature_distance(x[:0], y[:0]).shape == (0,)
    assert torch.equal(lpl_ext.feature_distance(x[:, :0], y[:, :0]), torch.zeros(2, dtype=dtype))


def test_feature_distance_batch_norm_of_one_value_is_nan_on_both(monkeypatch):
    x, y, _ = make_inputs((1, 3, 1, 1), seed=4)
    (n, _), (t, _) = both_backends(monkeypatch, lambda: distance_and_grad(x, y, None, "batch", "mse", 1.0,
                                                                          torch.ones(1, dtype=torch.float64)))
    assert bool(torch.isnan(n).all()) and bool(torch.isnan(t).all())


def test_feature_distance_bad_input_names_the_argument(monkeypatch):
    """No C code checks the fallback's inputs: its own checks give the kernels' messages."""
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    Counter(monkeypatch)
    x, y, mask = make_inputs((2, 3, 4, 4), dtype=torch.float32, masked=True)
    cases = [
        ((x, y[:, :2]), {}, ValueError, "y: shape"),
        ((x, y, mask[:1]), {}, ValueError, "mask: shape"),
        ((x, y, mask.float()), {}, TypeError, "mask: expected a bool or uint8"),
        ((x, y.double()), {}, TypeError, "y: dtype float64 does not match x dtype float32"),
        ((x.long(), y.long()), {}, TypeError, "x: expected float32, float64, float16 or bfloat16"),
        ((x, y, None), {"norm": "layer"}, ValueError, "norm: unknown option"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            lpl_ext.feature_distance(*args, **kwargs)
    with pytest.raises(ValueError, match="y: expected a 4-D"):
        lpl_ext.outlier_mask(y[0])
    with pytest.raises(TypeError, match="y: expected float32"):
        lpl_ext.outlier_mask(y.int())


# ---------------------------------------------------------------- outlier mask grid

def masks_and_stats(monkeypatch, y, **options):
    return both_backends(monkeypatch, lambda: lpl_ext.outlier_mask(y, return_stats=True, **options))


def assert_stats_agree(native, fallback, y):
    """Statistics of one layer at the size of reordered double sums: the mean at the scale
    of the layer's values, the std through its square (the variance is what the sums
    give: the kernel's sums shifted by each plane's mean leave a residue of the values'
    size, so a fully masked 70x90 plane of 0.1 has a std of 1.3e-9 there and 0 here),
    the ratio at its own scale."""
    finite = y[torch.isfinite(y)].double()
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    for got, want, name in zip(fallback, native, ("mean", "std", "outlier_ratio")):
        assert got.dtype == want.dtype == torch.float64 and got.dim() == 0
        g, w = float(got), float(want)
        if math.isnan(w):
            assert math.isnan(g), name
        elif name == "std":
            assert abs(g * g - w * w) <= 1e-12 * max(w * w, magnitude * magnitude) + 1e-30, (name, g, w)
        else:
            scale = abs(w) if name == "outlier_ratio" else max(abs(w), magnitude)
            assert abs(g - w) <= 1e-12 * scale + 1e-15, (name, g, w)


@pytest.mark.parametrize("shape", SMALL_SHAPES + [(1, 4, 96, 80)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_outlier_mask_grid(monkeypatch, shape, kind, dtype):
    y = make_features(shape, kind, seed=zlib.crc32(repr((shape, kind)).encode()) % 1000, dtype=dtype)
    if shape[2] * shape[3] > 16:
        y.view(-1)[:: 97] = math.nan  # non-finite values are left out of the statistics
    for closing, opening in [(3, 5), (1, 3), (7, 1)]:
        (keep_n, stats_n), (keep_t, stats_t) = masks_and_stats(monkeypatch, y, closing=closing, opening=opening)
        assert_same_mask(keep_t, keep_n)
        assert_stats_agree(stats_n, stats_t, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("norm", NORMS)
def test_plane_moments_on_the_torch_backend(monkeypatch, dtype, norm):
    """The plain-PyTorch backend's outlier mask gives the kernels' plane moments within
    rounding (counts exact), and its feature distance takes them as the kernels do: the
    same loss and gradient to reduction order."""
    y = make_features((3, 4, 21, 17), "spiky", seed=7, dtype=dtype)
    x = (y.double() + 0.2 * torch.randn(y.shape, generator=torch.Generator().manual_seed(8),
                                        dtype=torch.float64)).to(dtype)
    grad_out = torch.tensor([1.0, -0.5, 3.0])

    def run():
        keep, moments = lpl_ext.outlier_mask(y, return_plane_moments=True)
        xa = x.detach().clone().requires_grad_(True)
        loss = lpl_ext.feature_distance(xa, y, keep, norm=norm, distance="l1", plane_moments=moments)
        (loss * grad_out.to(loss.dtype)).sum().backward()
        return keep, moments, loss.detach(), xa.grad

    (keep_n, pm_n, loss_n, grad_n), (keep_t, pm_t, loss_t, grad_t) = both_backends(monkeypatch, run)
    assert_same_mask(keep_t, keep_n)
    assert pm_t.dtype == torch.float64 and torch.equal(pm_t[:, 2], pm_n[:, 2])
    assert_close_to_scale(pm_t[:, 0], pm_n[:, 0], rtol=1e-12, floor=1e-12 * float(pm_n[:, 1].max().sqrt()),
                          what="plane means")
    assert_close_to_scale(pm_t[:, 1], pm_n[:, 1], rtol=1e-12, what="plane M2")
    assert_same_to_reduction_order(loss_n, loss_t, dtype, "loss")
    assert_same_to_reduction_order(grad_n, grad_t, dtype, "gradient")


@pytest.mark.parametrize("closing,opening", WINDOWS)
def test_outlier_mask_every_window_pair(monkeypatch, closing, opening):
    for shape, kind in [((2, 2, 7, 7), "heavy"), ((1, 3, 3, 5), "normal"), ((1, 1, 40, 33), "spiky")]:
        y = make_features(shape, kind, seed=closing * 10 + opening)
        (keep_n, _), (keep_t, _) = masks_and_stats(monkeypatch, y, closing=closing, opening=opening)
        assert_same_mask(keep_t, keep_n)
    # windows wider than the plane cover all of it
    y = make_features((1, 2, 5, 6), "heavy", seed=1)
    for closing, opening in ((15, 1), (1, 13), (11, 21)):
        (keep_n, _), (keep_t, _) = masks_and_stats(monkeypatch, y, closing=closing, opening=opening)
        assert_same_mask(keep_t, keep_n)


@pytest.mark.parametrize("quantile,margin_std", [(0.001, 2.0), (0.1, 0.0), (0.25, 0.3), (0.49, 0.1), (0.02, 3.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_outlier_mask_quantile_and_margin(monkeypatch, quantile, margin_std, dtype):
    y = make_features((2, 2, 31, 17), "heavy", seed=7, dtype=dtype)
    (keep_n, _), (keep_t, _) = masks_and_stats(monkeypatch, y, quantile=quantile, margin_std=margin_std)
    assert_same_mask(keep_t, keep_n)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_outlier_mask_corner_planes(monkeypatch, dtype):
    """Constant planes (std exactly 0: nothing kept), a plane of +0 and -0, one value
    (NaN std), all non-finite, a plane whose rank product 50 * 0.02 is 1 only in
    double, and the empty layer."""
    # built in the dtype: a float64 0.1 summed 6300 times does not give 6300 * 0.1 exactly
    planes = [torch.full((1, 1, 7, 9), v, dtype=dtype) for v in (0.1, 3.7, 0.0, -2.5, 1000.1, 1 / 3)]
    planes += [torch.full((1, 1, 70, 90), v, dtype=dtype) for v in (0.1, 3.7, 1000.1)]
    signed_zero = torch.zeros(1, 1, 6, 6)
    signed_zero[0, 0, ::2] = -0.0
    planes += [signed_zero, torch.tensor([[[[1.5]]]]), make_features((1, 1, 5, 10), "heavy", seed=3)]
    odd = make_features((1, 3, 8, 8), "normal", seed=6)
    odd[0, 0] = math.nan
    odd[0, 1, ::2] = math.inf
    odd[0, 1, 1::2] = -math.inf
    planes.append(odd)
    for y in planes:
        (keep_n, stats_n), (keep_t, stats_t) = masks_and_stats(monkeypatch, y.to(dtype))
        assert_same_mask(keep_t, keep_n)
        assert_stats_agree(stats_n, stats_t, y.to(dtype))
    (keep_n, stats_n), (keep_t, stats_t) = masks_and_stats(monkeypatch, torch.zeros(0, 3, 4, 4, dtype=dtype))
    assert keep_t.shape == (0, 3, 4, 4) and all(math.isnan(float(s)) for s in stats_t)


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def threshold_edge_planes(dtype, n_planes, margin_std, seed, h=40, w=40, run=16):
    """Planes whose order-statistic tails hold runs of ``run`` consecutive values of
    ``dtype`` centred on q2 + margin * std and q1 - margin * std (iterated to a fixed
    point, since the runs move the std): some value lies on each threshold, so any other
    rounding of std, margin * std or the thresholds keeps or drops it differently."""
    g = torch.Generator().manual_seed(seed)
    length = h * w
    y = torch.randn(n_planes, length, generator=g, dtype=torch.float64).to(dtype)
    k1, k2 = max(int(length * 0.02), 1), max(int(length * 0.98), 1)
    for _ in range(60):
        before = y.clone()
        ordered = y.double().sort(dim=1).values
        spread = y.double().std(dim=1)
        centres = (ordered[:, k2 - 1] + margin_std * spread, ordered[:, k1 - 1] - margin_std * spread)
        for j, centre in enumerate(centres):
            bits = centre.to(dtype).view(_BITS[dtype]).long()
            y[:, j * run:(j + 1) * run] = (bits[:, None] + torch.arange(-(run // 2), run - run // 2)).to(
                _BITS[dtype]).view(dtype)
        if torch.equal(before, y):
            break
    return y.view(n_planes, 1, h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("margin_std", [2.0, 0.3, 2.5, 3.3])
def test_outlier_mask_values_on_the_thresholds(monkeypatch, dtype, margin_std):
    """Bit-identical masks where a value sits exactly on a threshold: the thresholds are
    rounded as the kernels round them (docs/spec.md, "Threshold test"). float64 is left
    out on purpose: there the spread is used unrounded, so the last bit of a reordered
    double sum may move a threshold by one ulp (docs/spec.md, "CPU and GPU agree")."""
    y = threshold_edge_planes(dtype, 32, margin_std, seed=int(margin_std * 10))
    (keep_n, _), (keep_t, _) = masks_and_stats(monkeypatch, y, margin_std=margin_std, closing=1, opening=1)
    on_edge = keep_n.view(32, -1)[:, :32]
    assert on_edge.any() and not on_edge.all()  # the runs do straddle the thresholds
    assert_same_mask(keep_t, keep_n)


# ---------------------------------------------------------------- the loss module and the objective

@pytest.fixture(scope="module")
def vaes():
    return {name: blob_vae(name) for name in ("sdxl_like", "shifted", "wide")}


@pytest.mark.parametrize("name,opts", parity.FIXED_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items()))
def test_module_fixed_mode_parity_on_the_torch_backend(vaes, monkeypatch, name, opts):
    """tests/test_module_parity.py's float64 fixed-mode oracle (docs/spec.md from
    plain-PyTorch pieces), run with LPL_EXT_BACKEND=torch."""
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    counter = Counter(monkeypatch)
    parity.test_fixed_mode_float64_parity(vaes, monkeypatch, name, opts)
    assert counter.calls["feature_distance"] > 0 and counter.calls["outlier_mask"] > 0


@pytest.mark.parametrize("name,opts", parity.COMPAT_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items()))
def test_module_compat_mode_parity_on_the_torch_backend(vaes, monkeypatch, name, opts):
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    counter = Counter(monkeypatch)
    parity.test_compat_mode_float64_parity(vaes, monkeypatch, name, opts)
    assert counter.calls["feature_distance"] > 0 and counter.calls["outlier_mask"] > 0


@pytest.mark.parametrize("run", parity._decoder_path_runs(), ids=lambda r: r["name"])
def test_recorded_reference_decoder_path_on_the_torch_backend(monkeypatch, run):
    """The public reference's own recorded end-to-end outputs, reproduced by compat mode
    on the torch backend: masks bit for bit, losses, latent gradients, statistics."""
    with np.load(parity.DATA / "lpl_decoder_path.npz") as d:
        recorded = {k: d[k] for k in d.files}
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    counter = Counter(monkeypatch)
    parity.test_compat_matches_the_recorded_reference_decoder_path(recorded, monkeypatch, run)
    assert counter.calls["outlier_mask"] > 0


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("norm_type", ["shared", "batch"])
def test_latent_perceptual_loss_float32_matches_the_kernels(monkeypatch, compat, norm_type):
    """The module as trainers run it (float32 VAE, checkpointing, stats): the torch backend
    gives the kernels' loss, latent gradient and statistics."""
    vae = tiny_vae("sdxl_like", seed=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = x + 0.4 * torch.randn(2, 4, 8, 8, generator=g)

    def run():
        lpl = LatentPerceptualLoss(vae, norm_type=norm_type, pow_law=True, reference_compat=compat)
        xa = x.clone().requires_grad_(True)
        loss = lpl.get_loss(xa, y)
        (loss * torch.tensor([1.0, -3.0])).sum().backward()
        return loss.detach(), xa.grad, torch.tensor([[s[k] for k in ("mean", "std", "outlier_ratio")]
                                                     for s in lpl.last_feature_stats])

    (loss_n, grad_n, stats_n), (loss_t, grad_t, stats_t) = both_backends(monkeypatch, run)
    # float32 decoder, the same on both sides; only the head's sums are reordered
    assert_close_to_scale(loss_t, loss_n, rtol=1e-5, what="loss")
    assert_close_to_scale(grad_t, grad_n, rtol=1e-5, what="latent gradient")
    assert_close_to_scale(stats_t, stats_n, rtol=1e-6, what="statistics")


def test_objective_on_the_torch_backend_matches_the_kernels(monkeypatch):
    from diffusers import DDPMScheduler

    vae = tiny_vae("sdxl_like", seed=4)
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 150, 700])
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = (noise + 0.2 * torch.randn(3, 4, 8, 8, generator=g))

    def run():
        obj = LPLObjective(vae, snr_gamma=5.0, scale=True)
        p = pred.clone().requires_grad_(True)
        lpl, logs = obj(p, noisy, latents, timesteps, prediction_type="epsilon",
                        alphas_cumprod=sched.alphas_cumprod)
        lpl.backward()
        return lpl.detach(), p.grad, {k: float(v) for k, v in logs.items()}

    (lpl_n, grad_n, logs_n), (lpl_t, grad_t, logs_t) = both_backends(monkeypatch, run)
    assert float(lpl_n) > 0 and logs_n["lpl_num_samples"] == 2.0
    assert_close_to_scale(lpl_t, lpl_n, rtol=1e-5, what="lpl")
    assert_close_to_scale(grad_t, grad_n, rtol=1e-5, what="prediction gradient")
    assert set(logs_t) == set(logs_n)
    for key in logs_n:
        assert logs_t[key] == pytest.approx(logs_n[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_operators_pass_opcheck_on_the_torch_backend(monkeypatch, dtype):
    """The operators' fake and autograd registrations hold for the fallback's outputs too
    (shapes, dtypes, strides, gradients): torch.compile traces the same operators."""
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    counter = Counter(monkeypatch)
    x, y, _ = make_inputs((2, 3, 9, 10), dtype=dtype, seed=5)
    keep = lpl_ext.outlier_mask(y)
    for args in ((x.requires_grad_(True), y, keep, "default", "l1", 0.5, True, True),
                 (x.detach(), y, None, "batch", "mse", 1.0, False, False)):
        result = torch.library.opcheck(torch.ops.lpl_ext.feature_distance.default, args)
        assert set(result.values()) == {"SUCCESS"}
    result = torch.library.opcheck(torch.ops.lpl_ext.outlier_mask.default, (y, 0.02, 2.0, 3, 5, True))
    assert set(result.values()) == {"SUCCESS"}
    assert counter.calls["feature_distance"] > 0 and counter.calls["outlier_mask"] > 0


# ---------------------------------------------------------------- choosing the backend

def test_backend_variable_is_validated(monkeypatch):
    x, y, _ = make_inputs((1, 2, 3, 3), dtype=torch.float32)
    for value in ("cuda", "Native!", "kernels"):
        monkeypatch.setenv("LPL_EXT_BACKEND", value)
        with pytest.raises(ValueError, match="LPL_EXT_BACKEND: expected one of auto, native, torch"):
            lpl_ext.feature_distance(x, y)
    for value, want in (("", "auto"), (" Torch ", "torch"), ("NATIVE", "native"), ("auto", "auto")):
        monkeypatch.setenv("LPL_EXT_BACKEND", value)
        assert _backend.requested_backend() == want


def test_native_and_auto_run_the_kernels_on_cpu(monkeypatch):
    x, y, mask = make_inputs((2, 3, 5, 5), masked=True)
    for value in ("native", "auto"):
        monkeypatch.setenv("LPL_EXT_BACKEND", value)
        with monkeypatch.context() as m:
            counter = Counter(m, forbid_kernels=False)
            lpl_ext.feature_distance(x, y, lpl_ext.outlier_mask(y))
            assert counter.calls == {"feature_distance": 0, "outlier_mask": 0}


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_fallback_warned", set())


def test_devices_without_kernels_fall_back_with_one_warning_naming_them(monkeypatch, fresh_warnings):
    """auto: MPS, XPU and any other device type run the torch backend, warned once per
    device type; native refuses them. CPU and CUDA (non-ROCm) use the kernels."""
    monkeypatch.delenv("LPL_EXT_BACKEND", raising=False)
    assert _backend.use_native_kernels(torch.device("cpu"))
    assert _backend.use_native_kernels(torch.device("cuda", 1))
    for kind in ("mps", "xpu", "privateuseone"):
        with pytest.warns(_backend.BackendFallbackWarning, match=f"no kernels for {kind} tensors") as record:
            assert not _backend.use_native_kernels(torch.device(kind))
        assert len(record) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _backend.use_native_kernels(torch.device(kind))  # once per device type
    monkeypatch.setenv("LPL_EXT_BACKEND", "native")
    with pytest.raises(RuntimeError, match="LPL_EXT_BACKEND=native: lpl_ext has no kernels for mps tensors"):
        _backend.use_native_kernels(torch.device("mps"))
    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _backend.use_native_kernels(torch.device("xpu"))
        assert not _backend.use_native_kernels(torch.device("cpu"))


def test_rocm_cuda_tensors_take_the_fallback(monkeypatch, fresh_warnings):
    """A ROCm build of torch presents AMD GPUs as "cuda" (DLPack kDLROCM): auto falls back
    with a warning naming ROCm before any capsule is made; native refuses clearly."""
    monkeypatch.delenv("LPL_EXT_BACKEND", raising=False)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    with pytest.warns(_backend.BackendFallbackWarning, match="ROCm build .*kDLROCM"):
        assert not _backend.use_native_kernels(torch.device("cuda", 0))
    assert _backend.use_native_kernels(torch.device("cpu"))
    monkeypatch.setenv("LPL_EXT_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native: this torch is a ROCm build"):
        _backend.use_native_kernels(torch.device("cuda", 0))


def test_kernels_refuse_a_rocm_capsule_clearly():
    """The C entry points refuse a DLPack capsule labelled kDLROCM (device type 10) with a
    ValueError naming the argument, and touch nothing."""
    from test_fuzz import DL_CODES, make_capsule

    kdl_rocm = 10
    hold: list = []
    x = np.ones((2, 3, 4, 4), np.float32)
    loss = np.full(2, -7.0)
    x_rocm = make_capsule(hold, x.ctypes.data, list(x.shape), None, *DL_CODES["float32"], device=kdl_rocm)
    y_rocm = make_capsule(hold, x.ctypes.data, list(x.shape), None, *DL_CODES["float32"], device=kdl_rocm)
    loss_rocm = make_capsule(hold, loss.ctypes.data, [2], None, *DL_CODES["float64"], device=kdl_rocm)
    with pytest.raises(ValueError, match=r"x: unsupported device type 10 \(only CPU and CUDA"):
        lpl_ext._C.feature_distance(x_rocm, y_rocm, None, loss_rocm, None, "shared", "mse", 1.0)
    keep = np.zeros(x.shape, np.bool_)
    y2 = make_capsule(hold, x.ctypes.data, list(x.shape), None, *DL_CODES["float32"], device=kdl_rocm)
    keep_rocm = make_capsule(hold, keep.ctypes.data, list(keep.shape), None, *DL_CODES["bool"], device=kdl_rocm)
    with pytest.raises(ValueError, match=r"y: unsupported device type 10"):
        lpl_ext._C.outlier_mask(y2, keep_rocm, None, 0.02, 2.0, 3, 5)
    assert np.all(loss == -7.0) and not keep.any()


def test_auto_fallback_end_to_end_on_a_device_the_kernels_refuse(monkeypatch, fresh_warnings):
    """The public functions, on tensors whose device has no kernels (stood in for by the
    CPU with the device check answering as for MPS): the torch backend runs, the kernels
    are never called, one warning names the device, the results are the kernels'."""
    x, y, _ = make_inputs((2, 6, 12, 10), dtype=torch.float32, seed=8)
    monkeypatch.delenv("LPL_EXT_BACKEND", raising=False)
    keep_n = lpl_ext.outlier_mask(y)
    loss_n, grad_n = distance_and_grad(x, y, keep_n, "shared", "mse", 0.5, torch.tensor([2.0, -1.0]))
    monkeypatch.setattr(_backend, "native_kernels_problem", lambda device: "lpl_ext has no kernels for mps tensors")
    counter = Counter(monkeypatch)
    with pytest.warns(_backend.BackendFallbackWarning, match="mps"):
        keep_t = lpl_ext.outlier_mask(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_t, grad_t = distance_and_grad(x, y, keep_t, "shared", "mse", 0.5, torch.tensor([2.0, -1.0]))
    assert counter.calls == {"feature_distance": 1, "outlier_mask": 1}
    assert_same_mask(keep_t, keep_n)
    assert_same_to_reduction_order(loss_n, loss_t, torch.float32, "loss")
    assert_same_to_reduction_order(grad_n, grad_t, torch.float32, "gradient")


# ---------------------------------------------------------------- devices without float64

class DtypeRecorder(TorchDispatchMode):
    """Dtypes of every tensor the operators inside the block produce."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_no_float64_is_made_on_a_device_without_it(monkeypatch):
    """MPS has no float64: with the device reported so (the CPU stands in), the loss
    module's scale/shift buffers, the fallback's wide sums, ranks' products (on the host)
    and statistics stay float32, and the results stay those of the kernels to float32
    rounding."""
    vae = tiny_vae("sdxl_like", seed=9)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = x + 0.4 * torch.randn(2, 4, 8, 8, generator=g)
    monkeypatch.delenv("LPL_EXT_BACKEND", raising=False)
    native = LatentPerceptualLoss(vae, norm_type="batch", reference_compat=False)
    want = native.get_loss(x, y)
    want_stats = native.last_feature_stats

    monkeypatch.setenv("LPL_EXT_BACKEND", "torch")
    monkeypatch.setattr(_torch_backend, "has_float64", lambda device, probe=True: False)
    rec = DtypeRecorder()
    for name in ("feature_distance", "outlier_mask"):
        # inside an operator the outer mode is off: record the backend's own operations too
        def recorded(*args, _real=getattr(_torch_backend, name), **kwargs):
            with rec:
                return _real(*args, **kwargs)

        monkeypatch.setattr(_torch_backend, name, recorded)
    lpl = LatentPerceptualLoss(vae, norm_type="batch", reference_compat=False)
    assert lpl.scale.dtype == lpl.shift.dtype == torch.float32
    assert lpl.to(torch.float64).to(torch.float32).scale.dtype == torch.float32
    assert float(lpl.scale) == float(np.float32(vae.config.scaling_factor))
    xa = x.clone().requires_grad_(True)
    with rec:
        loss = lpl.get_loss(xa, y)
        loss.sum().backward()
        stats = lpl.last_feature_stats
        keep, raw = lpl_ext.outlier_mask(y, return_stats=True)
    assert torch.float32 in rec.dtypes and torch.bool in rec.dtypes  # the recorder saw the backend
    assert torch.float64 not in rec.dtypes, rec.dtypes
    assert raw.mean.dtype == torch.float32
    assert_close_to_scale(loss.detach(), want, rtol=1e-5)
    for got, ref in zip(stats, want_stats):
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6)
