"""64-bit indexing on real tensors past 2^31 and 2^32 elements (docs/reliability.md, "64-bit indexing").

The tensors are real, C-contiguous numpy arrays, but almost all of their memory is never
written: ``np.zeros`` of this size is a fresh anonymous mapping, and Linux backs reads
of untouched pages with the shared zero page. Only a few rows per plane are written
(non-zero data at element offsets past 2^31 and 2^32), so a 4.3e9-element float32 tensor
costs ~0.3 GB of RAM instead of 17 GB. A kernel that indexed with 32-bit ints would
read the wrong rows there (or fault), and the losses / masks would not match the
plain-PyTorch oracle evaluated on just those rows.

SDXL at 1024 px has 578,813,952 feature values per sample and decoder pass: a batch of
four already passes 2^31.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lpl_ext
from lpl_ext import _C
from reference import ref_feature_distance, ref_outlier_mask

pytestmark = pytest.mark.slow

# (N, C, H, W): N*C*H*W = 4,295,098,368 > 2^32; sample 1 holds offset 2^31, the last rows of
# sample 2's last plane lie past 2^32.
FD_SHAPE = (3, 4, 16384, 21846)
# float32: every offset is an element index in int64_t, the same code for each dtype, and
# a pass over 4.3e9 float32 values takes ~7 s of CPU here against ~45 s for float16
# (converted to float one value at a time); outlier_mask below keeps float16.
FD_DTYPE = np.float32
ROWS = 6  # rows written at the end of every plane


def _zeros(shape: tuple, dtype: type) -> np.ndarray:
    a = np.zeros(shape, dtype)
    assert a.flags.c_contiguous
    return a


def _fd_inputs() -> tuple:
    n, c, h, w = FD_SHAPE
    # what the test relies on: the element count passes 2^32, and the written rows of planes
    # (1, 1) and (2, 3) hold the elements at offsets 2^31 and 2^32
    assert n * c * h * w > 2**32
    for s, ch, offset in ((1, 1, 2**31), (2, 3, 2**32)):
        assert ((s * c + ch) * h + h - ROWS) * w <= offset < (s * c + ch + 1) * h * w
    x = _zeros(FD_SHAPE, FD_DTYPE)
    y = _zeros(FD_SHAPE, FD_DTYPE)
    mask = _zeros(FD_SHAPE, np.uint8)
    rng = np.random.default_rng(0)
    region = (slice(None), slice(None), slice(h - ROWS, h), slice(None))
    x[region] = rng.standard_normal((n, c, ROWS, w)) * np.arange(1, n + 1).reshape(-1, 1, 1, 1)
    y[region] = rng.standard_normal((n, c, ROWS, w))
    mask[region] = rng.random((n, c, ROWS, w)) < 0.7
    return x, y, mask, region


@pytest.mark.parametrize("norm", ["shared", "batch"])
def test_feature_distance_past_2_32_elements(norm: str) -> None:
    """Loss of a (3, 4, 16384, 21846) float32 layer whose only kept values sit in the last
    rows of each plane: equal to the oracle on those rows alone (the other pixels are
    masked out, so every plane's sums and kept counts come from them)."""
    x, y, mask, region = _fd_inputs()
    loss = np.full(FD_SHAPE[0], -1.0)
    _C.feature_distance(x, y, mask, loss, None, norm, "mse", 1.0, 0, None)
    xr = torch.from_numpy(x[region].astype(np.float64))
    yr = torch.from_numpy(y[region].astype(np.float64))
    mr = torch.from_numpy(mask[region] != 0)
    if norm == "shared":
        # per-pixel norm over channels: the written rows hold every channel of their pixels
        want = ref_feature_distance(xr, yr, mr, norm="shared", distance="mse").numpy()
    else:
        # batch statistics run over all N*H*W positions of a channel; the unwritten ones are
        # masked (count as 0), so the oracle's rows are padded with zero rows in number
        # rather than in memory: mean and unbiased std from the rows' sums and the count
        count = FD_SHAPE[0] * FD_SHAPE[2] * FD_SHAPE[3]
        ym = torch.where(mr, yr, torch.zeros_like(yr))
        s1 = ym.sum((0, 2, 3), keepdim=True)
        s2 = (ym * ym).sum((0, 2, 3), keepdim=True)
        mean = s1 / count
        std = ((s2 - s1 * mean) / (count - 1)).sqrt()
        d = (xr - mean) / (std + 1e-6) - (ym - mean) / (std + 1e-6)
        k = mr.double()
        want = ((d * d * k).sum((2, 3)) / k.sum((2, 3))).mean(1).numpy()
    np.testing.assert_allclose(loss, want, rtol=2e-4)
    # every sample differs (x scaled by n + 1): a mixed-up offset would show
    assert len(set(np.round(loss, 3))) == FD_SHAPE[0]


# (1, C, 512, 512) with C = 8193: 2,147,745,792 elements; plane 8191 ends at exactly 2^31,
# plane 8192 lies entirely past it.
OM_SHAPE = (1, 8193, 512, 512)


def test_outlier_mask_past_2_31_elements() -> None:
    """outlier_mask of a (1, 8193, 512, 512) float16 layer: zero planes keep nothing, the
    planes written around and past offset 2^31 match the oracle, and the layer
    statistics count every element."""
    n, c, h, w = OM_SHAPE
    assert n * c * h * w > 2**31 and (c - 1) * h * w == 2**31
    y = _zeros(OM_SHAPE, np.float16)
    rng = np.random.default_rng(1)
    planted = [0, c - 3, c - 2, c - 1]
    vals = rng.standard_normal((len(planted), h, w))
    # blocks of outliers the mask must drop (a lone one is filled back by the closing)
    for i in range(len(planted)):
        for _ in range(20):
            r0, c0 = rng.integers(0, h - 12, 2)
            vals[i, r0:r0 + 12, c0:c0 + 12] = 40.0 * rng.choice([-1.0, 1.0])
    vals[1] *= 3.0
    y[0, planted] = vals
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    assert keep.shape == OM_SHAPE and keep.dtype == np.bool_
    want = ref_outlier_mask(torch.from_numpy(y[:, planted + [1, c // 2]].copy())).numpy()
    np.testing.assert_array_equal(keep[:, planted + [1, c // 2]], want)
    assert 0.5 < want[0, 1:4].mean() < 1.0  # the outliers (and their neighbours) are dropped
    # every other plane is all zeros: a constant plane keeps nothing
    assert planted == [0, c - 3, c - 2, c - 1]
    assert not keep[0, 1 : c - 3].any()  # a view: no 2 GB copy
    # layer statistics over all N*C*H*W values, masked ones counting as 0
    total = n * c * h * w
    kept_vals = np.where(want[0, :4], y[0, planted].astype(np.float64), 0.0)
    s1, s2 = kept_vals.sum(), (kept_vals ** 2).sum()
    mean = s1 / total
    std = np.sqrt((s2 - s1 * mean) / (total - 1))
    ratio = 1.0 - want[0, :4].sum() / total
    np.testing.assert_allclose([float(stats.mean), float(stats.std), float(stats.outlier_ratio)], [mean, std, ratio],
                               rtol=1e-9)
