"""lpl_ext.feature_distance against the plain-PyTorch formulation of the spec
(tests/reference.py) and against the reference implementation's own vectors."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import lpl_ext
from reference import ref_feature_distance
from lpl_ext._options import DISTANCES, NORMS  # the C module's lists, pinned in test_layering.py
from tolerance import assert_close_to_scale

DATA = Path(__file__).parent / "data"
SHAPES = [
    (1, 1, 1, 1),
    (3, 7, 5, 3),
    (1, 64, 16, 16),
    (3, 1, 257, 131),
    (1, 7, 33, 65),
    (3, 64, 9, 11),
]
CUDA_OK = torch.cuda.is_available() and lpl_ext.build_info()["cuda"]
CUDA_REASON = (
    "no CUDA GPU visible to torch" if not torch.cuda.is_available() else "lpl_ext was built without CUDA"
)


def make_inputs(shape, dtype=torch.float64, masked=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    # targets correlated with x, so normalized differences are not all O(1)
    y = 0.7 * x + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.2 if masked else None
    x, y = x.to(dtype).to(device), y.to(dtype).to(device)
    if mask is not None:
        mask = mask.to(device)
    return x, y, mask


def run_both(x, y, mask, norm, distance, weight, grad_out):
    """(loss, grad) of lpl_ext and of the reference, both for loss.(grad_out).sum()."""
    xa = x.detach().clone().requires_grad_(True)
    loss = lpl_ext.feature_distance(xa, y, mask, norm=norm, distance=distance, weight=weight)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    xr = x.detach().double().clone().requires_grad_(True)
    ref = ref_feature_distance(xr, y.double(), mask, norm, distance, weight)
    (ref * grad_out.double()).sum().backward()
    return loss.detach(), xa.grad, ref.detach(), xr.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.filterwarnings(r"ignore:std\(\)")  # the reference's std of one value per channel
def test_matches_reference_float64(shape, norm, distance, masked):
    x, y, mask = make_inputs(shape, masked=masked, seed=zlib.crc32(repr((shape, norm, distance)).encode()) % 1000)
    grad_out = torch.linspace(-1.5, 2.0, shape[0], dtype=torch.float64)
    loss, grad, ref, ref_grad = run_both(x, y, mask, norm, distance, 0.25, grad_out)
    if norm == "batch" and shape[0] * shape[2] * shape[3] == 1:
        # One value per channel has no unbiased std (torch.std gives NaN), so the
        # normalized prediction is NaN: lpl_ext's loss is NaN whatever the mask (docs/reliability.md,
        # "Non-finite values": a non-finite normalized prediction is never hidden by the mask). The
        # plain formulation agrees unless the mask drops that value (it selects, so 0).
        assert bool(torch.isnan(loss).all())
        empty = mask is not None and not bool(mask.any())
        assert bool(torch.isnan(ref).all()) != empty
        return
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


NON_CONTIGUOUS_LAYOUTS = ["transposed", "sliced", "channels_last"]


def non_contiguous_inputs(layout: str):
    """(x, y, mask) of make_inputs((2, 5, 14, 18), masked) as non-contiguous views: H and W
    transposed, a strided slice, or channels_last."""
    base = make_inputs((2, 5, 14, 18), masked=True, seed=3)
    if layout == "transposed":
        out = tuple(t.transpose(2, 3) for t in base)
    elif layout == "sliced":
        out = tuple(t[:, :, ::2, 1:] for t in base)
    else:
        out = tuple(t.contiguous(memory_format=torch.channels_last) for t in base)
    assert not out[0].is_contiguous()
    return out


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
def test_non_contiguous_inputs(norm, distance, layout):
    x, y, m = non_contiguous_inputs(layout)
    grad_out = torch.tensor([0.5, -2.0], dtype=torch.float64)
    loss, grad, ref, ref_grad = run_both(x, y, m, norm, distance, 1.0, grad_out)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.shape == x.shape


# Tolerances per dtype, relative to the float64 reference run on the same (rounded)
# inputs: accumulation is fp32 for every 16/32-bit dtype, so the loss error is the final
# rounding to the dtype plus fp32 summation error; gradients are stored in the dtype.
TOLS = {
    torch.float32: dict(loss_rtol=2e-5, grad_rtol=1e-4),
    torch.float16: dict(loss_rtol=2e-3, grad_rtol=2e-3),
    torch.bfloat16: dict(loss_rtol=1.6e-2, grad_rtol=1.6e-2),
}


@pytest.mark.parametrize("dtype", list(TOLS), ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", [(2, 7, 33, 17), (1, 64, 32, 32)], ids=["small", "c64"])
def test_low_precision(dtype, norm, distance, shape):
    x, y, mask = make_inputs(shape, dtype=dtype, masked=True, seed=11)
    grad_out = torch.tensor([1.0, -0.5][: shape[0]])
    loss, grad, ref, ref_grad = run_both(x, y, mask, norm, distance, 0.5, grad_out)
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = TOLS[dtype]
    assert_close_to_scale(loss.double(), ref, rtol=tol["loss_rtol"])
    scale = ref_grad.abs().max()
    err = (grad.double() - ref_grad).abs()
    # elementwise relative error, with an absolute floor for values near underflow: one
    # step of the dtype's subnormal grid (2**-24 for fp16) is the best storage can do
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bound = tol["grad_rtol"] * (ref_grad.abs() + 1e-3 * scale) + subnormal_step
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3e}, scale {float(scale):.3e}"


def test_fp16_eps_and_overflow_do_not_break():
    """Spec §6: 1e-10 vanishes in fp16 and the channel sum of squares overflows fp16
    (values ~300 over 512 channels: sum ~4.6e7 > 65504). Accumulation is fp32."""
    x, y, _ = make_inputs((1, 512, 4, 4), seed=5)
    x, y = x * 300, y * 300
    for norm in ("default", "shared"):
        half = lpl_ext.feature_distance(x.half(), y.half(), norm=norm)
        ref = ref_feature_distance(x.half().double(), y.half().double(), None, norm)
        assert torch.isfinite(half).all()
        assert_close_to_scale(half.double(), ref, rtol=2e-3)
    zeros = torch.zeros(1, 4, 3, 3, dtype=torch.float16)
    out = lpl_ext.feature_distance(zeros, zeros, norm="default")
    assert float(out) == 0.0


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(norm, distance, masked, seed):
    x, y, mask = make_inputs((2, 3, 4, 5), masked=masked, seed=100 + seed)
    x.requires_grad_(True)
    # gradcheck runs backward several times through one graph: reentrant=True
    fn = lambda inp: lpl_ext.feature_distance(  # noqa: E731
        inp, y, mask, norm=norm, distance=distance, weight=0.75, reentrant=True
    )
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_computed_in_forward_and_rescaled():
    """backward only multiplies the kept gradient: backward calls with different
    grad_outputs through one (reentrant) graph give proportional gradients."""
    x, y, mask = make_inputs((2, 4, 6, 6), masked=True)
    x.requires_grad_(True)
    loss = lpl_ext.feature_distance(x, y, mask, norm="default", reentrant=True)
    (g1,) = torch.autograd.grad(loss, x, torch.tensor([1.0, 1.0], dtype=torch.float64), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor([3.0, -2.0], dtype=torch.float64), retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(g2[0], 3 * g1[0])
    torch.testing.assert_close(g2[1], -2 * g1[1])
    torch.testing.assert_close(g3, g1, rtol=0, atol=0)


def test_default_backward_scales_in_place_once():
    """Without reentrant, backward scales the kept gradient in place (no second x-sized
    allocation); a second backward through the same graph is refused by torch's own
    in-place check instead of returning a wrong gradient."""
    x, y, mask = make_inputs((2, 4, 6, 6), masked=True)
    x.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad((ref_feature_distance(xr, y, mask, "shared") * torch.tensor([0.5, -4.0], dtype=torch.float64)).sum(), xr)
    loss = lpl_ext.feature_distance(x, y, mask, norm="shared")
    go = torch.tensor([0.5, -4.0], dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, x, go, retain_graph=True)
    torch.testing.assert_close(g, ref_grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x, go)


def test_no_grad_when_not_required():
    x, y, _ = make_inputs((2, 3, 4, 4))
    loss = lpl_ext.feature_distance(x, y)
    assert not loss.requires_grad
    with torch.no_grad():
        loss2 = lpl_ext.feature_distance(x.clone().requires_grad_(True), y)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss, loss2)


def test_empty_plane_contributes_zero_not_nan():
    x, y, _ = make_inputs((2, 3, 5, 5))
    mask = torch.ones(2, 3, 5, 5, dtype=torch.bool)
    mask[0, 1] = False  # a fully masked plane: the reference divides 0 by 0
    x.requires_grad_(True)
    loss = lpl_ext.feature_distance(x, y, mask, norm="shared")
    assert torch.isfinite(loss).all()
    ref = ref_feature_distance(x.detach(), y, mask, "shared")
    torch.testing.assert_close(loss.detach(), ref)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert float(x.grad[0, 1].abs().max()) == 0.0


def test_masked_target_values_are_ignored():
    """y is treated as y * keep: garbage (even NaN) under the mask changes nothing."""
    x, y, mask = make_inputs((2, 4, 7, 7), masked=True)
    y_dirty = y.clone()
    y_dirty[~mask] = float("nan")
    for norm in NORMS:
        a = lpl_ext.feature_distance(x, y * mask, mask, norm=norm)
        b = lpl_ext.feature_distance(x, y_dirty, mask, norm=norm)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nan_prediction_is_visible():
    x, y, mask = make_inputs((2, 3, 4, 4), masked=True)
    x[1, 0, 0, 0] = float("nan")
    mask[1, 0, 0, 0] = False  # even where the target is masked out
    loss = lpl_ext.feature_distance(x, y, mask, norm="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def test_reference_vectors():
    """The reference implementation's own per-layer losses and gradients."""
    index = json.loads((DATA / "index.json").read_text())
    cases = [e for e in index if e["kind"] == "layer_loss"]
    assert len(cases) >= 40
    for e in cases:
        d = np.load(DATA / e["file"])
        x = torch.tensor(d["x"], requires_grad=True)
        norm = "none" if e["norm_type"] == "batch" else e["norm_type"]  # reference 'batch' is a no-op
        w = 2.0 ** -min(e["layer_index"], 3) if e["pow_law"] else 1.0
        loss = lpl_ext.feature_distance(
            x, torch.tensor(d["y"]), torch.tensor(d["keep"]), norm=norm, distance=e["loss_type"], weight=w
        )
        (loss * torch.tensor(d["grad_output"])).sum().backward()
        np.testing.assert_allclose(loss.detach().numpy(), d["loss"], rtol=1e-10, err_msg=e["file"])
        np.testing.assert_allclose(x.grad.numpy(), d["grad_x"], rtol=1e-8, atol=1e-14, err_msg=e["file"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("norm", NORMS)
def test_numpy_inputs(dtype, norm):
    x, y, mask = make_inputs((2, 5, 9, 7), masked=True, seed=7)
    xn, yn, mn = x.numpy().astype(dtype), y.numpy().astype(dtype), mask.numpy()
    out = lpl_ext.feature_distance(xn, yn, mn, norm=norm, distance="l1")
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == (2,)
    expect = lpl_ext.feature_distance(
        torch.from_numpy(xn), torch.from_numpy(yn), torch.from_numpy(mn), norm=norm, distance="l1"
    )
    np.testing.assert_array_equal(out, expect.numpy())
    # non-native byte order and non-contiguous arrays are converted, not misread
    swapped = xn.astype(xn.dtype.newbyteorder(">"))
    np.testing.assert_array_equal(lpl_ext.feature_distance(swapped, yn, mn, norm=norm, distance="l1"), out)
    np.testing.assert_array_equal(
        lpl_ext.feature_distance(np.asfortranarray(xn), yn, mn.astype(np.uint8), norm=norm, distance="l1"), out
    )


# ---------------------------------------------------------------- plane moments
# feature_distance(..., plane_moments=): the outlier mask's per-plane moments of
# where(mask, y, 0) stand in for the kernel's own pass over the mask and y (kept counts;
# batch statistics), docs/spec.md "Feature distance".
MOMENT_SHAPES = [(2, 5, 9, 13), (3, 1, 17, 11), (1, 7, 33, 65), (3, 4, 40, 50)]
MOMENT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def outlier_inputs(shape, dtype, seed):
    """x, y with outliers in y, and y's outlier mask with its plane moments."""
    x, y, _ = make_inputs(shape, dtype=torch.float64, seed=seed)
    y.view(-1)[::23] *= 60  # outliers for the mask to drop (no closing that would restore them)
    if shape[1] > 1:
        y[0, 0] = 0.375  # a constant plane keeps nothing: its coefficient is 0
    x, y = x.to(dtype), y.to(dtype)
    keep, moments = lpl_ext.outlier_mask(y, closing=1, opening=1, return_plane_moments=True)
    assert 0 < int(keep.sum()) < keep.numel()
    return x, y, keep, moments


def loss_and_grad(x, y, mask, norm, distance, grad_out, **kwargs):
    xa = x.detach().clone().requires_grad_(True)
    loss = lpl_ext.feature_distance(xa, y, mask, norm=norm, distance=distance, weight=0.75, **kwargs)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), xa.grad


@pytest.mark.parametrize("dtype", MOMENT_DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_plane_moments_change_nothing_but_the_batch_statistics_order(dtype, norm, distance):
    """With the outlier mask's moments: default / shared / none bit-identical to the call
    without them (the kept counts are the same integers); batch within the tolerances of
    the plain-PyTorch oracle (its statistics are merged from the planes' moments instead of
    being summed here: another order of the sums)."""
    for k, shape in enumerate(MOMENT_SHAPES):
        x, y, keep, moments = outlier_inputs(shape, dtype, seed=60 + k)
        grad_out = torch.linspace(-1.5, 2.0, shape[0], dtype=torch.float64)
        loss, grad = loss_and_grad(x, y, keep, norm, distance, grad_out, plane_moments=moments)
        want_loss, want_grad = loss_and_grad(x, y, keep, norm, distance, grad_out)
        if norm != "batch":
            assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad), shape
            continue
        xr = x.detach().double().clone().requires_grad_(True)
        ref = ref_feature_distance(xr, y.double(), keep, norm, distance, 0.75)
        (ref * grad_out).sum().backward()
        if dtype == torch.float64:
            torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad, xr.grad, rtol=1e-9, atol=1e-12)
        else:
            tol = TOLS[dtype]
            assert_close_to_scale(loss.double(), ref.detach(), rtol=tol["loss_rtol"])
            assert_close_to_scale(grad.double(), xr.grad, rtol=tol["grad_rtol"])
            # and within the rounding of the statistics of the call without them
            assert_close_to_scale(grad.double(), want_grad.double(), rtol=8 * torch.finfo(dtype).eps)


def test_plane_moments_are_used_for_the_kept_counts_and_batch_statistics():
    """The kernel takes what it is given (it cannot check them without the pass they save):
    doubled kept counts halve every plane's coefficient, a 4 times larger M2 (twice the
    channel std) about quarters the batch loss. So the moments are the ones read, not
    recomputed."""
    x, y, keep, moments = outlier_inputs((2, 5, 9, 13), torch.float64, seed=3)
    half = moments.clone()
    half[:, 2] *= 2
    for norm in ("shared", "none", "default"):
        full = lpl_ext.feature_distance(x, y, keep, norm=norm, plane_moments=moments)
        torch.testing.assert_close(lpl_ext.feature_distance(x, y, keep, norm=norm, plane_moments=half), full / 2,
                                   rtol=1e-15, atol=0)
    wider = moments.clone()
    wider[:, 1] *= 4
    a = lpl_ext.feature_distance(x, y, keep, norm="batch", plane_moments=moments)
    b = lpl_ext.feature_distance(x, y, keep, norm="batch", plane_moments=wider)
    torch.testing.assert_close(b, a / 4, rtol=0.05, atol=0)  # (the planes' means keep their spread)


def test_plane_moments_numpy_and_weighted():
    x, y, keep, moments = outlier_inputs((2, 5, 9, 13), torch.float32, seed=4)
    for norm in NORMS:
        want = lpl_ext.feature_distance(x, y, keep, norm=norm, plane_moments=moments)
        got = lpl_ext.feature_distance(x.numpy(), y.numpy(), keep.numpy(), norm=norm, plane_moments=moments.numpy())
        np.testing.assert_array_equal(got, want.numpy())
        sw = torch.tensor([0.5, 2.0])
        xa = x.clone().requires_grad_(True)
        total, loss = lpl_ext.weighted_feature_distance(xa, y, keep, sample_weight=sw, norm=norm,
                                                        plane_moments=moments)
        total.backward()
        xb = x.clone().requires_grad_(True)
        (lpl_ext.feature_distance(xb, y, keep, norm=norm, plane_moments=moments) * sw).sum().backward()
        assert torch.equal(loss, want)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)


def test_bad_plane_moments_name_the_argument():
    x, y, keep, moments = outlier_inputs((2, 5, 9, 13), torch.float32, seed=5)
    cases = [
        (dict(mask=None, plane_moments=moments), ValueError, "plane_moments: given without a mask"),
        (dict(mask=keep, plane_moments=moments[:9]), ValueError, r"plane_moments: expected shape \(10, 3\)"),
        (dict(mask=keep, plane_moments=moments.reshape(-1)), ValueError, r"plane_moments: expected shape"),
        (dict(mask=keep, plane_moments=moments.float()), TypeError, "plane_moments: expected dtype float64"),
        (dict(mask=keep, plane_moments=moments.numpy()), TypeError, "plane_moments: expected a torch.Tensor"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            lpl_ext.feature_distance(x, y, **kwargs)
        with pytest.raises(error, match=message):
            lpl_ext.weighted_feature_distance(x, y, **kwargs, sample_weight=torch.ones(2))
    with pytest.raises(TypeError, match="plane_moments: expected dtype float64"):
        lpl_ext.feature_distance(x.numpy(), y.numpy(), keep.numpy(), plane_moments=moments.numpy().astype(np.float32))
    # the C entry point checks them too (its callers need not be the public functions)
    loss = np.empty(2)
    for kwargs, error, message in [
        (dict(mask=None, plane_moments=moments.numpy()), ValueError, "plane_moments: given without a mask"),
        (dict(mask=keep.numpy(), plane_moments=moments.numpy()[:9]), ValueError,
         r"plane_moments: expected shape \(10, 3\)"),
        (dict(mask=keep.numpy(), plane_moments=moments.numpy().astype(np.float32)), TypeError,
         "plane_moments: expected dtype float64"),
        (dict(mask=keep.numpy(), plane_moments=np.asfortranarray(moments.numpy())), ValueError,
         "plane_moments: expected a contiguous"),
    ]:
        with pytest.raises(error, match=message):
            lpl_ext._C.feature_distance(x.numpy(), y.numpy(), kwargs["mask"], loss, None, "batch", "mse", 1.0,
                                        plane_moments=kwargs["plane_moments"])


class TestBadInput:
    def setup_method(self):
        self.x, self.y, self.mask = make_inputs((2, 3, 4, 4), dtype=torch.float32, masked=True)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="y: shape"):
            lpl_ext.feature_distance(self.x, self.y[:, :2])

    def test_ndim(self):
        with pytest.raises(ValueError, match="x: expected a 4-D"):
            lpl_ext.feature_distance(self.x[0], self.y[0])
        with pytest.raises(ValueError, match="x: expected a 4-D"):
            lpl_ext.feature_distance(self.x.numpy()[0], self.y.numpy()[0])

    def test_mask_shape_and_dtype(self):
        with pytest.raises(ValueError, match="mask: shape"):
            lpl_ext.feature_distance(self.x, self.y, self.mask[:1])
        with pytest.raises(TypeError, match="mask: expected a bool or uint8"):
            lpl_ext.feature_distance(self.x, self.y, self.mask.float())

    def test_mixed_dtypes(self):
        with pytest.raises(TypeError, match="y: dtype float64 does not match x dtype float32"):
            lpl_ext.feature_distance(self.x, self.y.double())

    def test_integer_tensors(self):
        with pytest.raises(TypeError, match="x: expected float32, float64, float16 or bfloat16"):
            lpl_ext.feature_distance(self.x.long(), self.y.long())

    def test_unknown_options(self):
        with pytest.raises(ValueError, match="norm: unknown option 'layer'"):
            lpl_ext.feature_distance(self.x, self.y, norm="layer")
        with pytest.raises(ValueError, match="distance: unknown option 'l2'"):
            lpl_ext.feature_distance(self.x, self.y, distance="l2")
        with pytest.raises(ValueError, match="weight: must be finite"):
            lpl_ext.feature_distance(self.x, self.y, weight=float("inf"))

    def test_mixed_kinds(self):
        with pytest.raises(TypeError, match="y: expected a torch.Tensor"):
            lpl_ext.feature_distance(self.x, self.y.numpy())
        with pytest.raises(TypeError, match="x: expected a torch.Tensor or numpy.ndarray"):
            lpl_ext.feature_distance([1.0], self.y)

    def test_c_entry_rejects_bad_outputs(self):
        x, y = self.x.numpy(), self.y.numpy()
        with pytest.raises(TypeError, match="loss: expected dtype float64"):
            lpl_ext._C.feature_distance(x, y, None, np.empty(2, np.float32), None, "shared", "mse", 1.0)
        with pytest.raises(ValueError, match="loss: expected a 1-D tensor of length 2"):
            lpl_ext._C.feature_distance(x, y, None, np.empty(3), None, "shared", "mse", 1.0)
        ro = np.empty(2)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="loss: output array is read-only"):
            lpl_ext._C.feature_distance(x, y, None, ro, None, "shared", "mse", 1.0)
        with pytest.raises(ValueError, match="x: expected a C-contiguous"):
            lpl_ext._C.feature_distance(x.transpose(0, 1, 3, 2), y, None, np.empty(2), None, "shared", "mse", 1.0)

    @pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)
    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="y: on cpu:0 but x is on cuda"):
            lpl_ext.feature_distance(self.x.cuda(), self.y)
        keep, moments = lpl_ext.outlier_mask(self.y, return_plane_moments=True)
        with pytest.raises(ValueError, match="plane_moments: on cpu:0 but x is on cuda"):
            lpl_ext.feature_distance(self.x.cuda(), self.y.cuda(), keep.cuda(), plane_moments=moments)


@pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("norm", NORMS)
    @pytest.mark.parametrize("distance", DISTANCES)
    @pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
    def test_cuda_matches_cpu(self, dtype, norm, distance, masked):
        x, y, mask = make_inputs((3, 7, 33, 65), dtype=dtype, masked=masked, seed=21)
        go = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
        out = {}
        for dev in ("cpu", "cuda"):
            xd = x.to(dev).requires_grad_(True)
            loss = lpl_ext.feature_distance(
                xd, y.to(dev), None if mask is None else mask.to(dev), norm=norm, distance=distance, weight=0.5
            )
            (loss * go.to(dev)).sum().backward()
            out[dev] = (loss.detach().cpu().double(), xd.grad.cpu().double())
        rtol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=rtol, atol=1e-12)
        scale = out["cpu"][1].abs().max()
        torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=rtol, atol=rtol * 1e-2 * float(scale))

    def test_no_host_sync_and_stream(self):
        """Forward and backward on a side stream, with torch's sync debug mode raising on
        any host sync: loss and gradient are those of the CPU kernel."""
        x, y, mask = make_inputs((2, 16, 96, 80), dtype=torch.float32, masked=True, seed=24, device="cuda")
        x.requires_grad_(True)
        go = torch.tensor([0.5, -2.0], device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the current stream
        with torch.cuda.stream(stream):
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss = lpl_ext.feature_distance(x, y, mask, norm="shared", distance="mse", weight=0.5)
                (loss * go).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(stream)  # loss and x.grad come from the side stream
        x_cpu = x.detach().cpu().requires_grad_(True)
        want = lpl_ext.feature_distance(x_cpu, y.cpu(), mask.cpu(), norm="shared", distance="mse", weight=0.5)
        (want * go.cpu()).sum().backward()
        assert_close_to_scale(loss.detach().cpu(), want.detach(), rtol=1e-4)
        torch.testing.assert_close(x.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-6 * float(x_cpu.grad.abs().max()))

    def test_cuda_gradcheck(self):
        x, y, mask = make_inputs((2, 3, 4, 5), masked=True, device="cuda")
        x.requires_grad_(True)
        for norm in NORMS:
            fn = lambda inp: lpl_ext.feature_distance(inp, y, mask, norm=norm, reentrant=True)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cuda_tensors_the_call_cannot_run_are_refused():
    """CUDA tensors handed to the C entry point without what a CUDA launch needs (the
    stream, the loaded kernels, the workspace) raise a Python exception naming CUDA, before
    any memory is touched, in every build (with or without CUDA kernels).
    No GPU is needed: DLPack capsules that label host memory as CUDA stand in for device
    tensors, and nothing may read or write through them."""
    from test_fuzz import DL_CODES, make_capsule

    hold: list = []
    x = np.ones((2, 3, 4, 4), np.float32)
    loss = np.full(2, -7.0)
    grad = np.full(x.shape, -7.0, np.float32)
    x_cuda = make_capsule(hold, x.ctypes.data, list(x.shape), None, *DL_CODES["float32"], device=2)
    y_cuda = make_capsule(hold, x.ctypes.data, list(x.shape), None, *DL_CODES["float32"], device=2)
    loss_cuda = make_capsule(hold, loss.ctypes.data, [2], None, *DL_CODES["float64"], device=2)
    grad_cuda = make_capsule(hold, grad.ctypes.data, list(x.shape), None, *DL_CODES["float32"], device=2)
    for grad_arg in (None, grad_cuda):
        with pytest.raises((RuntimeError, ValueError), match="(?i)cuda"):
            lpl_ext._C.feature_distance(x_cuda, y_cuda, None, loss_cuda, grad_arg, "shared", "mse", 1.0)
    assert np.all(loss == -7.0) and np.all(grad == -7.0)  # nothing written
    if torch.cuda.is_available() and not lpl_ext.build_info()["cuda"]:
        # a GPU machine with a build that has no CUDA kernels: the public function says so
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            lpl_ext.feature_distance(torch.ones(2, 3, 4, 4, device="cuda"), torch.ones(2, 3, 4, 4, device="cuda"))


@pytest.mark.parametrize("setting", ["0", "1", "yes"])
def test_hugepage_advice_switch_never_changes_results(monkeypatch, setting):
    """LPL_EXT_HUGEPAGES only advises the OS about the gradient buffer (> 4 MiB here): the
    loss and gradient are bit-identical whatever it says."""
    x, y, mask = make_inputs((2, 4, 384, 512), dtype=torch.float32, masked=True, seed=5)
    monkeypatch.delenv("LPL_EXT_HUGEPAGES", raising=False)
    _, grad_default, _, _ = run_both(x, y, mask, "shared", "mse", 1.0, torch.ones(2))
    monkeypatch.setenv("LPL_EXT_HUGEPAGES", setting)
    xa = x.detach().clone().requires_grad_(True)
    lpl_ext.feature_distance(xa, y, mask, norm="shared").sum().backward()
    assert torch.equal(xa.grad, grad_default)
