"""NaN / Inf policy of the public API (documented in docs/reliability.md, "Non-finite values").

- A non-finite prediction value (x) makes its sample's loss non-finite (NaN or +-Inf),
  whatever the mask says (even in a fully masked plane): masking never hides a broken
  prediction. The sample's gradient is non-finite where torch autograd's is (always for
  mse; l1 uses torch's subgradient sign(NaN) = 0). Other samples' losses and gradients
  are bit-identical to a call without the bad value.
- A non-finite target value (y) that the mask drops is ignored exactly as if it were 0
  (outlier_mask never keeps a non-finite value, so the usual pipeline is immune). A kept
  one makes its sample's loss non-finite; with norm="batch" it poisons its channel's
  statistics and so every sample's loss (they are batch statistics).
- outlier_mask: non-finite values are never kept and stay out of the order statistics
  and std of their plane; the layer statistics stay finite.
- Non-finite options (weight, quantile, margin_std) raise ValueError.
- None of this leaves state behind: later calls give bit-identical results, and no
  floating-point trap is switched on.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest
import torch

import lpl_ext
from lpl_ext import _C
from reference import ref_feature_distance, ref_outlier_mask
from lpl_ext._options import DISTANCES, NORMS  # the C module's lists, pinned in test_layering.py

BAD = [float("nan"), float("inf"), -float("inf")]
SHAPE = (3, 4, 6, 7)


def _data(dtype: torch.dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    y = torch.randn(SHAPE, generator=g).to(dtype)
    return x, y


def _enabled_fp_traps() -> int:
    """glibc's fegetexcept(): the floating-point exceptions that trap (SIGFPE)."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    return int(libm.fegetexcept())


def _run(x, y, mask, norm, distance, grad: bool):
    """Loss (float64 numpy) and, when grad, d(sum loss)/dx (float64 numpy)."""
    if grad:
        xr = x.clone().requires_grad_(True)
        loss = lpl_ext.feature_distance(xr, y, mask, norm=norm, distance=distance)
        (g,) = torch.autograd.grad(loss.sum(), xr)
        return loss.detach().double().numpy(), g.double().numpy()
    loss = lpl_ext.feature_distance(x, y, mask, norm=norm, distance=distance)
    return loss.double().numpy(), None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mask_kind", ["none", "dropped_here", "plane_dropped"])
def test_nonfinite_prediction_is_visible(dtype: torch.dtype, norm: str, mask_kind: str) -> None:
    """NaN/+Inf/-Inf in x: that sample's loss (and gradient) is non-finite even where the
    mask drops the value; the other samples are bit-identical to a clean call."""
    x, y = _data(dtype)
    mask = None
    pos = (1, 2, 3, 4)
    if mask_kind != "none":
        mask = torch.ones(SHAPE, dtype=torch.bool)
        if mask_kind == "dropped_here":
            mask[pos] = False
        else:
            mask[pos[0], pos[1]] = False  # the whole (n, c) plane contributes nothing
    for distance in DISTANCES:
        clean_loss, clean_grad = _run(x, y, mask, norm, distance, grad=True)
        assert np.all(np.isfinite(clean_loss))
        for bad in BAD:
            xb = x.clone()
            xb[pos] = bad
            loss, grad = _run(xb, y, mask, norm, distance, grad=True)
            others = [i for i in range(SHAPE[0]) if i != pos[0]]
            assert not np.isfinite(loss[pos[0]]), (distance, bad, loss)
            np.testing.assert_array_equal(loss[others], clean_loss[others])
            np.testing.assert_array_equal(grad[others], clean_grad[others])
            # the plain-PyTorch formulation agrees: the loss is not finite, and the
            # sample's gradient is non-finite exactly when torch autograd's is (NaN
            # always is; l1 at +-Inf has the finite subgradient sign(d))
            if mask_kind == "plane_dropped":
                # tests/reference.py drops a fully masked plane with torch.where, which
                # also drops its NaN; lpl_ext keeps it visible (0 * NaN is NaN)
                if distance == "mse":
                    assert not np.all(np.isfinite(grad[pos[0]])), (distance, bad)
                continue
            xr = xb.double().requires_grad_(True)
            ref = ref_feature_distance(xr, y.double(), mask, norm=norm, distance=distance)
            (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
            assert not torch.isfinite(ref[pos[0]])
            assert np.all(np.isfinite(grad[pos[0]])) == bool(torch.isfinite(ref_grad[pos[0]]).all()), (
                distance, bad, "gradient finiteness differs from torch autograd")


@pytest.mark.parametrize("norm", NORMS)
def test_nonfinite_prediction_numpy(norm: str) -> None:
    """Same policy through the numpy front door (float32, float16 and float64 arrays)."""
    for np_dtype in (np.float32, np.float16, np.float64):
        x, y = (t.numpy().astype(np_dtype) for t in _data(torch.float64, seed=3))
        clean = lpl_ext.feature_distance(x, y, norm=norm)
        for bad in BAD:
            xb = x.copy()
            xb[0, 3, 5, 6] = bad
            loss = lpl_ext.feature_distance(xb, y, norm=norm)
            assert not np.isfinite(loss[0])
            np.testing.assert_array_equal(loss[1:], clean[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_dropped_nonfinite_target_is_ignored(dtype: torch.dtype, norm: str) -> None:
    """A non-finite y where the mask is 0 gives exactly the loss and gradient of y = 0
    there (the masked value is replaced, never multiplied by 0)."""
    x, y = _data(dtype, seed=1)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(SHAPE, generator=g) > 0.2
    positions = [(0, 0, 0, 0), (1, 3, 5, 6), (2, 1, 2, 3)]
    for p in positions:
        mask[p] = False
    y_zero = y.clone()
    for p in positions:
        y_zero[p] = 0
    for distance in DISTANCES:
        want_loss, want_grad = _run(x, y_zero, mask, norm, distance, grad=True)
        assert np.all(np.isfinite(want_loss))
        for bad in BAD:
            yb = y.clone()
            for p in positions:
                yb[p] = bad
            loss, grad = _run(x, yb, mask, norm, distance, grad=True)
            np.testing.assert_array_equal(loss, want_loss)
            np.testing.assert_array_equal(grad, want_grad)


@pytest.mark.parametrize("norm", NORMS)
def test_kept_nonfinite_target_is_visible(norm: str) -> None:
    """A kept non-finite y: its sample's loss is non-finite; with norm="batch" every
    sample's loss is (the channel's batch statistics are non-finite)."""
    x, y = _data(torch.float32, seed=2)
    clean, _ = _run(x, y, None, norm, "mse", grad=False)
    for bad in BAD:
        yb = y.clone()
        yb[2, 0, 1, 1] = bad
        loss, _ = _run(x, yb, None, norm, "mse", grad=False)
        assert not np.isfinite(loss[2])
        if norm == "batch":
            assert not np.any(np.isfinite(loss))
        else:
            np.testing.assert_array_equal(loss[:2], clean[:2])
        ref = ref_feature_distance(x.double(), yb.double(), None, norm=norm, distance="mse")
        np.testing.assert_array_equal(np.isfinite(ref.numpy()), np.isfinite(loss))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_outlier_mask_pipeline_drops_nonfinite_targets(dtype: torch.dtype) -> None:
    """outlier_mask never keeps NaN/Inf, matches the oracle, reports finite statistics,
    and feature_distance with its mask is finite and equal to the call with those
    targets set to 0."""
    g = torch.Generator().manual_seed(7)
    y = torch.randn(2, 3, 16, 16, generator=g).to(dtype)
    x = torch.randn(2, 3, 16, 16, generator=g).to(dtype)
    y[0, 0, 3, 3] = float("nan")
    y[0, 1, 8, 2] = float("inf")
    y[1, 2, 0, 15] = -float("inf")
    y[1, 0] = float("nan")  # a plane with no finite value keeps nothing
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    assert not keep[~torch.isfinite(y)].any()
    assert not keep[1, 0].any()
    torch.testing.assert_close(keep, ref_outlier_mask(y), rtol=0, atol=0)
    for s in stats:
        assert torch.isfinite(torch.as_tensor(s)), stats
    y_zero = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
    for norm in NORMS:
        loss = lpl_ext.feature_distance(x, y, keep, norm=norm)
        assert torch.isfinite(loss).all(), (norm, loss)
        torch.testing.assert_close(loss, lpl_ext.feature_distance(x, y_zero, keep, norm=norm), rtol=0, atol=0)


def test_outlier_mask_numpy_nonfinite_planes() -> None:
    """numpy front door: all-NaN, all-Inf and mixed planes never keep a non-finite value."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    y[0, 0] = np.nan
    y[0, 1] = np.inf
    y[0, 2, ::2] = -np.inf
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    assert not keep[~np.isfinite(y)].any()
    assert not keep[0, :2].any()
    np.testing.assert_array_equal(keep, ref_outlier_mask(torch.from_numpy(y)).numpy())
    assert np.all(np.isfinite(np.array(stats, dtype=np.float64)))


def test_float16_near_limit_stays_finite() -> None:
    """Finite float16 inputs whose channel sum of squares passes float16's range (65504)
    still give a finite loss: the sums are accumulated in float32."""
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(2, 8, 5, 5, generator=g) * 6e4).half()
    y = (torch.rand(2, 8, 5, 5, generator=g) * 6e4).half()
    for norm in NORMS:
        loss = lpl_ext.feature_distance(x, y, norm=norm, distance="l1")
        assert torch.isfinite(loss).all(), norm
        ref = ref_feature_distance(x.double(), y.double(), None, norm=norm, distance="l1")
        torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=1e-6)


def test_nonfinite_options_raise() -> None:
    x, y = _data(torch.float32)
    for bad in BAD:
        with pytest.raises(ValueError, match="weight"):
            lpl_ext.feature_distance(x, y, weight=bad)
        with pytest.raises(ValueError, match="weight"):
            _C.feature_distance(x.numpy(), y.numpy(), None, np.zeros(SHAPE[0]), None, "shared", "mse", bad)
        with pytest.raises(ValueError, match="quantile"):
            lpl_ext.outlier_mask(y, quantile=bad)
        with pytest.raises(ValueError, match="margin_std"):
            lpl_ext.outlier_mask(y, margin_std=bad)
        with pytest.raises(ValueError, match="quantile"):
            _C.outlier_mask(y.numpy(), np.zeros(SHAPE, bool), None, bad, 2.0, 3, 5)


def test_no_state_left_behind() -> None:
    """After a burst of non-finite calls, clean calls are bit-identical to before, numpy's
    error state is unchanged and no floating-point trap is enabled."""
    x, y = _data(torch.float32, seed=9)
    mask = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) > 0.3
    traps, np_err = _enabled_fp_traps(), np.geterr()

    def clean_results() -> list:
        out = []
        for norm in NORMS:
            loss, grad = _run(x, y, mask, norm, "mse", grad=True)
            out += [loss, grad]
        keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
        out += [keep.numpy(), torch.stack(list(stats)).numpy()]
        return out

    before = clean_results()
    for bad in BAD:
        xb, yb = x.clone(), y.clone()
        xb[0, 0] = bad
        yb[1, 1] = bad
        for norm in NORMS:
            _run(xb, yb, mask, norm, "l1", grad=True)
            _run(xb, yb, None, norm, "mse", grad=False)
        lpl_ext.outlier_mask(yb, return_stats=True)
        lpl_ext.outlier_mask(torch.full(SHAPE, bad), return_stats=True)
    after = clean_results()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert _enabled_fp_traps() == traps == 0
    assert np.geterr() == np_err
