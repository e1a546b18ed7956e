"""The kernels as PyTorch operators (lpl_ext._ops): torch.library.opcheck on CPU (and
CUDA when present), the public functions routed through them, the numpy path kept
direct, and the deprecated FeatureDistanceFunction (once the path for torch < 2.4) being
the operator itself.

Oracle for values and gradients: the float64 plain-PyTorch restatement in
tests/reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lpl_ext
from lpl_ext.feature_distance import FeatureDistanceFunction
from reference import ref_feature_distance, ref_outlier_mask

DEVICES = ["cpu"] + (["cuda"] if lpl_ext.build_info()["cuda_available"] else [])


def features(shape=(2, 3, 9, 10), seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    y[0, 0, 0, 0] = 40.0  # an outlier the mask drops
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


class OpRecorder(TorchDispatchMode):
    """Names of the operators dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,distance,reentrant,with_mask,dtype", [
    ("shared", "mse", False, True, torch.float32),
    ("default", "l1", True, False, torch.float32),
    ("batch", "mse", False, True, torch.float64),
    ("none", "l1", False, True, torch.float32),
    ("shared", "mse", True, True, torch.bfloat16),
])
def test_opcheck_feature_distance(device, norm, distance, reentrant, with_mask, dtype):
    x, y = features(device=device, dtype=dtype)
    x.requires_grad_(True)
    mask = lpl_ext.outlier_mask(y) if with_mask else None
    result = torch.library.opcheck(torch.ops.lpl_ext.feature_distance.default,
                                   (x, y, mask, norm, distance, 0.5, True, reentrant))
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4
    # Without a gradient request (the no_grad / inference path) too.
    result = torch.library.opcheck(torch.ops.lpl_ext.feature_distance.default,
                                   (x.detach(), y, mask, norm, distance, 1.0, False, False))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_stats,dtype", [(True, torch.float32), (False, torch.float16),
                                                (True, torch.float64)])
def test_opcheck_outlier_mask(device, return_stats, dtype):
    _, y = features(shape=(2, 3, 12, 11), device=device, dtype=dtype)
    result = torch.library.opcheck(torch.ops.lpl_ext.outlier_mask.default, (y, 0.02, 2.0, 3, 5, return_stats))
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_stats,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_opcheck_outlier_mask_moments_and_the_distance_taking_them(device, return_stats, dtype):
    x, y = features(shape=(2, 3, 12, 11), device=device, dtype=dtype)
    result = torch.library.opcheck(torch.ops.lpl_ext.outlier_mask_moments.default, (y, 0.02, 2.0, 3, 5, return_stats))
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4
    keep, _, moments = torch.ops.lpl_ext.outlier_mask_moments(y, 0.02, 2.0, 3, 5, return_stats)
    x.requires_grad_(True)
    for norm in ("batch", "shared"):
        result = torch.library.opcheck(torch.ops.lpl_ext.feature_distance.default,
                                       (x, y, keep, norm, "mse", 0.5, True, False, moments))
        assert set(result.values()) == {"SUCCESS"}
        sw = torch.tensor([0.5, 2.0], device=device)
        result = torch.library.opcheck(torch.ops.lpl_ext.weighted_feature_distance.default,
                                       (x, y, keep, norm, "mse", 0.5, sw, True, False, moments))
        assert set(result.values()) == {"SUCCESS"}


def test_public_functions_go_through_the_operators():
    x, y = features()
    x.requires_grad_(True)
    with OpRecorder() as rec:
        keep = lpl_ext.outlier_mask(y)
        loss = lpl_ext.feature_distance(x, y, keep, weight=0.25)
    assert "lpl_ext.outlier_mask" in rec.names and "lpl_ext.feature_distance" in rec.names
    want = ref_feature_distance(x.double(), y.double(), ref_outlier_mask(y.double()), norm="shared",
                                distance="mse", weight=0.25)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-8)


def test_fake_implementations_give_shapes_and_dtypes_without_running_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4, 5, 6, dtype=torch.bfloat16)
        y = torch.empty(3, 4, 5, 6, dtype=torch.bfloat16)
        loss, grad = torch.ops.lpl_ext.feature_distance(x, y, None, "shared", "mse", 1.0, True, False)
        keep, stats = torch.ops.lpl_ext.outlier_mask(y, 0.02, 2.0, 3, 5, True)
        _, no_grad = torch.ops.lpl_ext.feature_distance(x, y, None, "shared", "mse", 1.0, False, False)
        _, no_stats = torch.ops.lpl_ext.outlier_mask(y, 0.02, 2.0, 3, 5, False)
        with pytest.raises(ValueError, match="y: shape"):
            torch.ops.lpl_ext.feature_distance(x, y[:1], None, "shared", "mse", 1.0, True, False)
        keep_m, stats_m, moments = torch.ops.lpl_ext.outlier_mask_moments(y, 0.02, 2.0, 3, 5, False)
        loss_m, _ = torch.ops.lpl_ext.feature_distance(x, y, keep_m, "batch", "mse", 1.0, True, False, moments)
        with pytest.raises(ValueError, match="plane_moments: expected shape"):
            torch.ops.lpl_ext.feature_distance(x, y, keep_m, "batch", "mse", 1.0, True, False, moments[:3])
    assert (keep_m.shape, stats_m.shape, moments.shape, moments.dtype) == ((3, 4, 5, 6), (0,), (12, 3), torch.float64)
    assert (loss_m.shape, loss_m.dtype) == ((3,), torch.bfloat16)
    assert (loss.shape, loss.dtype) == ((3,), torch.bfloat16)
    assert (grad.shape, grad.dtype) == ((3, 4, 5, 6), torch.bfloat16)
    assert (keep.shape, keep.dtype) == ((3, 4, 5, 6), torch.bool)
    assert (stats.shape, stats.dtype) == ((3,), torch.float64)
    assert no_grad.shape == (0,) and no_stats.shape == (0,)


def test_numpy_inputs_keep_their_direct_path():
    x, y = features(dtype=torch.float64)
    xn, yn = x.numpy(), y.numpy()
    with OpRecorder() as rec:
        keep, stats = lpl_ext.outlier_mask(yn, return_stats=True)
        loss = lpl_ext.feature_distance(xn, yn, keep, norm="default", weight=0.5)
    assert rec.names == []  # no torch operator at all
    assert isinstance(keep, np.ndarray) and isinstance(loss, np.ndarray)
    assert float(stats.outlier_ratio) == pytest.approx(1.0 - keep.mean(), abs=1e-12)
    want = ref_feature_distance(x, y, ref_outlier_mask(y), norm="default", distance="mse", weight=0.5)
    np.testing.assert_allclose(loss, want.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(keep, ref_outlier_mask(y).numpy())


@pytest.mark.parametrize("reentrant", [False, True])
def test_deprecated_function_is_the_operator(reentrant):
    """FeatureDistanceFunction.apply (the autograd.Function of torch < 2.4) warns and runs
    the operator and its autograd: the same values and gradients, bit for bit."""
    x, y = features(seed=3)
    keep = lpl_ext.outlier_mask(y)
    g_out = torch.tensor([0.5, -2.0])
    results = []
    for deprecated in (False, True):
        xr = x.clone().requires_grad_(True)
        with OpRecorder() as rec:
            if deprecated:
                with pytest.warns(DeprecationWarning, match="lpl_ext.feature_distance"):
                    loss = FeatureDistanceFunction.apply(xr, y, keep, "batch", "l1", 0.5, reentrant)
            else:
                loss = lpl_ext.feature_distance(xr, y, keep, norm="batch", distance="l1", weight=0.5,
                                                reentrant=reentrant)
        assert "lpl_ext.feature_distance" in rec.names
        (grad,) = torch.autograd.grad(loss, xr, g_out)
        results.append((loss.detach(), grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    want = ref_feature_distance(x.double().requires_grad_(True), y.double(), keep, norm="batch", distance="l1",
                                weight=0.5)
    torch.testing.assert_close(results[0][0].double(), want.detach(), rtol=1e-5, atol=1e-8)


def test_backward_rescales_in_place_unless_reentrant():
    x, y = features(seed=4)
    keep = lpl_ext.outlier_mask(y)
    for reentrant in (False, True):
        xr = x.clone().requires_grad_(True)
        loss = lpl_ext.feature_distance(xr, y, keep, reentrant=reentrant)
        (g1,) = torch.autograd.grad(loss, xr, torch.tensor([2.0, 3.0]), retain_graph=True)
        if reentrant:
            (g2,) = torch.autograd.grad(loss, xr, torch.tensor([2.0, 3.0]))
            torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        else:
            # The kept gradient was scaled in place: a second backward is refused.
            with pytest.raises(RuntimeError, match="inplace"):
                torch.autograd.grad(loss, xr, torch.tensor([2.0, 3.0]))
        xd = x.double().requires_grad_(True)
        want = ref_feature_distance(xd, y.double(), keep, norm="shared", distance="mse", weight=1.0)
        (gw,) = torch.autograd.grad(want, xd, torch.tensor([2.0, 3.0], dtype=torch.float64))
        torch.testing.assert_close(g1.double(), gw, rtol=1e-4, atol=1e-7)


def test_y_and_mask_are_constants():
    x, y = features(seed=5)
    x.requires_grad_(True)
    y.requires_grad_(True)
    loss = lpl_ext.feature_distance(x, y)
    loss.sum().backward()
    assert y.grad is None and x.grad is not None
    assert not lpl_ext.feature_distance(x.detach(), y).requires_grad
    with torch.no_grad():
        assert not lpl_ext.feature_distance(x, y).requires_grad


def test_bad_arguments_still_name_the_argument():
    x, y = features()
    with pytest.raises(ValueError, match="weight: must be finite"):
        lpl_ext.feature_distance(x, y, weight=float("nan"))
    with pytest.raises(TypeError, match="y: expected a torch.Tensor"):
        lpl_ext.feature_distance(x, y.numpy())
    with pytest.raises(TypeError, match="mask"):
        lpl_ext.feature_distance(x, y, mask=[1])
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        lpl_ext.feature_distance(x[0], y[0])
    with pytest.raises(ValueError, match="norm"):
        lpl_ext.feature_distance(x, y, norm="layer")
    with pytest.raises(ValueError, match="y"):
        lpl_ext.feature_distance(x, y[:1])  # the kernel names the mismatching argument
    with pytest.raises(ValueError, match="quantile"):
        lpl_ext.outlier_mask(y, quantile=0.7)
    with pytest.raises(ValueError, match="y: expected a 4-D"):
        lpl_ext.outlier_mask(y[0])
