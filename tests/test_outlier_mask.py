"""lpl_ext.outlier_mask against the plain-PyTorch formulation of docs/spec.md, "Outlier mask"
(tests/reference.py: kthvalue, std, max_pool2d per plane) bit for bit, against the
reference implementation's own masks (tests/data/outlier_*.npz), and its statistics
against torch."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lpl_ext
from reference import outlier_windows as ref_outlier_windows
from reference import ref_outlier_mask

DATA = Path(__file__).parent / "data"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KINDS = ["normal", "heavy", "ties", "silu", "spiky", "relu"]
CUDA_OK = torch.cuda.is_available() and lpl_ext.build_info()["cuda"]
CUDA_REASON = (
    "no CUDA GPU visible to torch" if not torch.cuda.is_available() else "lpl_ext was built without CUDA"
)

# torch warns that std() of one value has no degrees of freedom (the 1x1 planes)
pytestmark = pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")


def make_features(shape, kind: str, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Decoder-feature-like test data of several distributions."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        y = torch.randn(shape, generator=g)
    elif kind == "heavy":  # Student-t(2)-like: heavy tails, per-channel scale and offset
        z = torch.randn(shape, generator=g)
        chi = (torch.randn(shape, generator=g) ** 2 + torch.randn(shape, generator=g) ** 2) / 2
        scale = torch.rand(shape[:2], generator=g)[..., None, None] * 4 + 0.1
        offset = torch.randn(shape[:2], generator=g)[..., None, None] * 3
        y = z / chi.clamp_min(1e-3).sqrt() * scale + offset
    elif kind == "ties":  # few distinct values: the order statistics sit in long runs of ties
        y = torch.randint(-3, 4, shape, generator=g).float() * 0.5
    elif kind == "silu":  # post-activation: half the mass piled up just below 0
        y = F.silu(torch.randn(shape, generator=g) * 4)
    elif kind == "spiky":  # 1% of huge activations, as in real VAE decoder layers
        y = torch.randn(shape, generator=g)
        spikes = torch.rand(shape, generator=g) < 0.01
        y = torch.where(spikes, torch.randn(shape, generator=g) * 1000, y)
    elif kind == "relu":  # most values exactly zero, of both signs (-0.0 sorts below +0.0 as a key)
        x = torch.randn(shape, generator=g)
        neg_zero = torch.rand(shape, generator=g) < 0.5
        y = torch.where(x > 0.5, x, torch.where(neg_zero, torch.tensor(-0.0), torch.tensor(0.0)))
    else:
        raise ValueError(kind)
    return y.to(dtype)


def assert_same_mask(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.bool and got.shape == want.shape
    diff = (got != want).sum().item()
    assert diff == 0, f"{diff} of {want.numel()} mask values differ"


# ---------------------------------------------------------------- reference vectors

def _outlier_cases():
    index = json.loads((DATA / "index.json").read_text())
    return [e for e in index if e["kind"] == "outlier_mask"]


@pytest.mark.parametrize("case", _outlier_cases(), ids=lambda e: e["file"])
def test_reference_vectors(case):
    data = np.load(DATA / case["file"])
    y, want = data["y"], data["keep"]
    closing, opening = case["closing"], case["opening"]
    assert (closing, opening) == lpl_ext.outlier_windows(case["down_factor"])
    got_np = lpl_ext.outlier_mask(y, quantile=case["quantile"], margin_std=case["margin_std"], closing=closing,
                                  opening=opening)
    assert got_np.dtype == np.bool_
    np.testing.assert_array_equal(got_np, want)
    got_t = lpl_ext.outlier_mask(torch.from_numpy(y), quantile=case["quantile"], margin_std=case["margin_std"],
                                 closing=closing, opening=opening)
    assert_same_mask(got_t, torch.from_numpy(want))


# ---------------------------------------------------------------- bit-exact grids

SMALL_SHAPES = [(1, 1, 1, 1), (2, 3, 3, 5), (3, 2, 5, 3), (1, 2, 7, 7), (2, 1, 64, 64)]


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_matches_reference_dtypes(shape, kind, dtype):
    """Every dtype, run by the reference in that dtype (kthvalue / std / arithmetic of
    torch in float16 and bfloat16 too), for the reference's two window pairs."""
    y = make_features(shape, kind, seed=zlib.crc32(repr((shape, kind)).encode()) % 1000, dtype=dtype)
    for closing, opening in [(3, 5), (1, 3)]:
        got = lpl_ext.outlier_mask(y, closing=closing, opening=opening)
        assert_same_mask(got, ref_outlier_mask(y, closing=closing, opening=opening))


WINDOWS = [(c, o) for c in (1, 3, 5, 7) for o in (1, 3, 5, 7)]


@pytest.mark.parametrize("closing,opening", WINDOWS)
def test_every_window_pair(closing, opening):
    # 7x7 and 3x5 planes are no larger than the 7x7 windows: the borders dominate
    for shape, kind in [((2, 2, 7, 7), "heavy"), ((1, 3, 3, 5), "normal"), ((1, 1, 40, 33), "spiky")]:
        y = make_features(shape, kind, seed=closing * 10 + opening)
        got = lpl_ext.outlier_mask(y, closing=closing, opening=opening)
        assert_same_mask(got, ref_outlier_mask(y, closing=closing, opening=opening))


@pytest.mark.parametrize("quantile,margin_std", [(0.001, 2.0), (0.1, 0.0), (0.25, 0.3), (0.49, 0.1), (0.02, 3.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_quantile_and_margin(quantile, margin_std, dtype):
    """Other quantiles and margins, including ones not representable in the dtype."""
    y = make_features((2, 2, 31, 17), "heavy", seed=7, dtype=dtype)
    got = lpl_ext.outlier_mask(y, quantile=quantile, margin_std=margin_std)
    assert_same_mask(got, ref_outlier_mask(y, quantile, margin_std))


@pytest.mark.parametrize("layout", [(1, 4), (4, 1)], ids=["N1xC4", "N4xC1"])
@pytest.mark.parametrize("kind", ["heavy", "ties", "silu", "relu"])
def test_large_planes(layout, kind):
    """Planes above the direct-select size (histogram + candidate select), in both N/C
    layouts; N*C = 4 > 2 threads runs one plane per thread."""
    y = make_features((*layout, 96, 80), kind, seed=3)
    assert_same_mask(lpl_ext.outlier_mask(y), ref_outlier_mask(y))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_single_large_plane(dtype):
    """One 256x256 plane: with several OpenMP threads the whole team splits the plane by
    rows (per-thread histograms, halo rows of the filters). The same plane inside a
    batch (one plane per thread) gives the same mask."""
    y = make_features((1, 1, 256, 256), "spiky", seed=11, dtype=dtype)
    alone = lpl_ext.outlier_mask(y)
    assert_same_mask(alone, ref_outlier_mask(y))
    batch = torch.cat([y, make_features((3, 1, 256, 256), "normal", seed=12, dtype=dtype)])
    assert_same_mask(lpl_ext.outlier_mask(batch)[:1], alone)


def test_matches_batched_reference_formulation():
    """The reference implementation's own vectorized code (kthvalue(dim=-1), std(-1),
    max pools), with k clamped, on finite data of many planes."""
    y = make_features((2, 8, 24, 40), "heavy", seed=5)
    n, c, h, w = y.shape
    flat = y.flatten(-2, -1)
    length = h * w
    k1, k2 = max(int(length * 0.02), 1), max(int(length * 0.98), 1)
    q1 = flat.kthvalue(k1, dim=-1).values[..., None, None]
    q2 = flat.kthvalue(k2, dim=-1).values[..., None, None]
    m = 2 * flat.std(-1)[..., None, None]
    mask = ((q1 - m < y) * (y < q2 + m)).float()
    mask = F.max_pool2d(mask, 3, stride=1, padding=1)
    mask = (-F.max_pool2d(-mask, 5, stride=1, padding=2)).bool()
    assert_same_mask(lpl_ext.outlier_mask(y), mask)


# ---------------------------------------------------------------- corner cases

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_constant_planes_keep_nothing(dtype):
    """A constant plane has std exactly 0, so q1 - 0 < p < q2 + 0 fails everywhere."""
    planes = []
    for value in (0.1, 3.7, 0.0, -2.5, 1000.1, 1 / 3):
        planes.append(torch.full((1, 1, 7, 9), value))
    planes.append(torch.full((1, 1, 70, 90), 0.1))  # histogram path
    for p in planes:
        y = p.to(dtype)
        got = lpl_ext.outlier_mask(y)
        assert not got.any()
        assert_same_mask(got, ref_outlier_mask(y))
    # mixed with ordinary planes in one batch, against the batched std of torch
    y = torch.cat([torch.full((1, 2, 9, 9), 0.1), make_features((1, 2, 9, 9), "normal", seed=1)], 1).to(dtype)
    got = lpl_ext.outlier_mask(y)
    assert not got[0, :2].any()
    assert_same_mask(got, ref_outlier_mask(y))
    assert_same_mask(got[:, 2:], ref_outlier_mask(y[:, 2:]))


def test_tiny_planes():
    """Planes under 50 values (the reference's k1 = 0 crash) and a 1x1 plane, whose std of
    one value is NaN: nothing kept, as torch."""
    y1 = torch.tensor([[[[1.5]]]])
    assert not lpl_ext.outlier_mask(y1).any()
    for shape in [(1, 1, 2, 2), (2, 2, 1, 7), (1, 3, 6, 8)]:
        y = make_features(shape, "normal", seed=2)
        assert_same_mask(lpl_ext.outlier_mask(y, closing=1, opening=1), ref_outlier_mask(y, closing=1, opening=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_non_finite_values_never_kept_and_do_not_poison(dtype):
    y = make_features((2, 2, 40, 30), "normal", seed=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    bad = torch.rand(y.shape, generator=g) < 0.05
    kinds = torch.randint(0, 3, y.shape, generator=g)
    special = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[kinds]
    y_bad = torch.where(bad, special, y).to(dtype)
    got = lpl_ext.outlier_mask(y_bad, closing=1, opening=1)
    assert not got[bad].any()
    assert_same_mask(got, ref_outlier_mask(y_bad, closing=1, opening=1))
    # without filters, the finite values' decisions are those of the finite subset alone
    for plane in range(4):
        n, c = divmod(plane, 2)
        vals = y_bad[n, c][~bad[n, c]]
        cnt = vals.numel()
        k1, k2 = max(int(cnt * 0.02), 1), max(int(cnt * 0.98), 1)
        m = 2.0 * vals.std()
        lo, hi = vals.kthvalue(k1).values - m, vals.kthvalue(k2).values + m
        expect = (lo < y_bad[n, c]) & (y_bad[n, c] < hi) & ~bad[n, c]
        assert torch.equal(got[n, c], expect)
    # with the default filters too
    assert_same_mask(lpl_ext.outlier_mask(y_bad), ref_outlier_mask(y_bad))


def test_all_non_finite_plane():
    y = make_features((1, 3, 8, 8), "normal", seed=6)
    y[0, 0] = math.nan
    y[0, 1, ::2] = math.inf
    y[0, 1, 1::2] = -math.inf
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    assert not keep[0, :2].any()
    assert_same_mask(keep, ref_outlier_mask(y))
    assert all(math.isfinite(float(s)) for s in stats)


# ---------------------------------------------------------------- statistics

def expected_stats(y: torch.Tensor, keep: torch.Tensor):
    ym = torch.where(keep, y.double(), torch.zeros((), dtype=torch.float64))
    return ym.mean().item(), ym.std().item(), 1.0 - keep.double().mean().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("kind", ["heavy", "spiky"])
def test_stats_match_torch(dtype, kind):
    y = make_features((2, 3, 33, 47), kind, seed=8, dtype=dtype)
    y[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    assert isinstance(stats, lpl_ext.OutlierStats)
    for s in stats:
        assert isinstance(s, torch.Tensor) and s.dtype == torch.float64 and s.dim() == 0
    mean, std, ratio = expected_stats(y, keep)
    assert keep.sum() < keep.numel()  # something was removed
    np.testing.assert_allclose(float(stats.mean), mean, rtol=1e-12, atol=1e-12 * std)
    np.testing.assert_allclose(float(stats.std), std, rtol=1e-12)
    assert float(stats.outlier_ratio) == pytest.approx(ratio, abs=1e-15)


def test_stats_single_plane_team_and_numpy():
    y = make_features((1, 1, 200, 160), "spiky", seed=10)
    keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
    mean, std, ratio = expected_stats(y, keep)
    # the mean is compared on the scale of the std (spikes of 1e3 around a mean of 0.1)
    np.testing.assert_allclose(float(stats.mean), mean, rtol=0, atol=1e-12 * std)
    np.testing.assert_allclose(float(stats.std), std, rtol=1e-12)
    assert float(stats.outlier_ratio) == pytest.approx(ratio, abs=1e-15)
    keep_np, stats_np = lpl_ext.outlier_mask(y.numpy(), return_stats=True)
    np.testing.assert_array_equal(keep_np, keep.numpy())
    np.testing.assert_allclose(np.array(stats_np, dtype=np.float64), [float(s) for s in stats], rtol=1e-15)


# ---------------------------------------------------------------- reduction order
# The one reduction order of lpl_kernel_abi.h ("the outlier mask's one reduction order"),
# evaluated here in numpy float64 (elementwise IEEE adds and products, no fused
# multiply-add): tiles of 32 x 64, lane l of 256 sums tile positions l, l + 256, ... in
# turn, the lanes and then the tiles combined by the fixed pairwise tree, the planes by
# the same tree with Chan's merge.
TILE_H, TILE_W, LANES = 32, 64, 256


def _tree(items: list, combine) -> object:
    """lpl_om_tree: for s = P/2 .. 1, item i < s takes in item i + s where that exists."""
    a, n = list(items), len(items)
    s = 1
    while s < n:
        s <<= 1
    s >>= 1
    while s > 0:
        for i in range(min(s, n - s)):
            a[i] = combine(a[i], a[i + s], i, s, n)
        s >>= 1
    return a[0]


def _lane_tree(lanes: np.ndarray) -> np.ndarray:
    """The tree over the last axis (LANES), vectorized over the leading ones."""
    lanes = lanes.copy()
    s = LANES // 2
    while s > 0:
        lanes[..., :s] = lanes[..., :s] + lanes[..., s:2 * s]
        s >>= 1
    return lanes[..., 0]


def ordered_plane_sum(terms: np.ndarray, selected: np.ndarray) -> float:
    """Sum of terms[selected] (one h x w plane, float64) in the reduction order."""
    h, w = terms.shape
    th, tw = -(-h // TILE_H), -(-w // TILE_W)
    padded = np.zeros((th * TILE_H, tw * TILE_W))
    padded[:h, :w] = np.where(selected, terms, 0.0)  # +0.0 for an absent value: no change to a sum
    # (tile_y, tile_x, step, lane): position t = step * 256 + lane of each tile, row-major
    steps = padded.reshape(th, TILE_H, tw, TILE_W).transpose(0, 2, 1, 3).reshape(th, tw, -1, LANES)
    lanes = np.zeros((th, tw, LANES))
    for k in range(steps.shape[2]):  # each lane's values one after the other
        lanes = lanes + steps[:, :, k]
    tiles = _lane_tree(lanes).reshape(-1)
    return _tree([float(t) for t in tiles], lambda a, b, *_: a + b)


def ordered_plane_moments(y: torch.Tensor, keep: torch.Tensor) -> list:
    """Per (n, c) plane (mean, M2, kept) of where(keep, y, 0) for the mask the kernel
    returned, with every sum in the reduction order (the kernels' plane_moments)."""
    n, c, h, w = y.shape
    length = float(h * w)
    planes = []
    for v, k in zip(y.double().reshape(-1, h, w).numpy(), keep.reshape(-1, h, w).numpy()):
        finite = np.isfinite(v)
        count = float(finite.sum())
        values = v[finite]
        if count and np.all(values.view(np.uint64) == values.view(np.uint64)[0]):
            mean = float(values[0])  # a constant plane's mean is its value exactly
        else:
            mean = ordered_plane_sum(v, finite) / count if count else 0.0
        kept = float(k.sum())
        d = np.where(k, v, 0.0) - mean
        s1, s2 = ordered_plane_sum(d, k), ordered_plane_sum(d * d, k)
        zeros = length - kept
        s1 -= zeros * mean
        s2 += zeros * mean * mean
        m2 = s2 - s1 * s1 / length
        planes.append((mean + s1 / length, max(m2, 0.0), kept))
    return planes


def ordered_stats(y: torch.Tensor, keep: torch.Tensor) -> list:
    """Layer mean, std and outlier ratio of where(keep, y, 0) for the mask the kernel
    returned, with every sum in the reduction order."""
    length = float(y.shape[2] * y.shape[3])
    planes = ordered_plane_moments(y, keep)

    def merge(a, b, i, s, count):  # lpl_om_tree_merge_planes / lpl_om_merge_moments
        n_a = length * float((count - i + 2 * s - 1) // (2 * s))
        n_b = length * float((count - i - s + 2 * s - 1) // (2 * s))
        total = n_a + n_b
        delta = b[0] - a[0]
        return (a[0] + delta * (n_b / total), a[1] + (b[1] + delta * delta * (n_a * n_b / total)), a[2] + b[2])

    mean, m2, kept = _tree(planes, merge)
    total = length * len(planes)
    return [mean, math.sqrt(m2 / (total - 1.0)), 1.0 - kept / total]


def _bits(values) -> list:
    return [float(v).hex() for v in values]


def _with_nonfinite(y: torch.Tensor) -> torch.Tensor:
    flat = y.view(-1)
    flat[::97] = math.nan
    flat[5::101] = math.inf
    flat[11::103] = -math.inf
    return y


# (shape, kind): odd sides (edge tiles), C = 1, several bands of tiles, and planes that
# fewer than 2 or 3 OpenMP threads share (the team path: len >= 32768, planes < threads)
ORDER_SHAPES = [((2, 3, 9, 13), "heavy"), ((1, 1, 71, 130), "spiky"), ((1, 1, 300, 257), "heavy"),
                ((1, 2, 161, 211), "silu")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_stats_follow_the_reduction_order(dtype):
    """The layer mean, std and ratio are the bits of the documented reduction order (the
    one the CUDA kernels follow too, tests/test_cuda_emulated.py)."""
    for i, (shape, kind) in enumerate(ORDER_SHAPES):
        y = _with_nonfinite(make_features(shape, kind, seed=30 + i, dtype=dtype))
        keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
        assert keep.sum() < keep.numel()
        assert _bits(stats) == _bits(ordered_stats(y, keep)), (shape, kind)


def torch_plane_moments(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N*C, 3) mean, M2 and kept count of where(keep, y, 0) per plane, written with torch
    (float64, two passes): the kernels' values up to the order of the sums."""
    n, c, h, w = y.shape
    ym = torch.where(keep, y.double(), torch.zeros((), dtype=torch.float64)).reshape(n * c, h * w)
    mean = ym.mean(dim=1)
    m2 = ((ym - mean[:, None]) ** 2).sum(dim=1)
    return torch.stack([mean, m2, keep.reshape(n * c, -1).sum(dim=1).double()], dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_plane_moments_follow_the_reduction_order(dtype):
    """return_plane_moments: per plane the mean, M2 and kept count of where(keep, y, 0), the
    bits of the documented reduction order (those the CUDA kernels write too,
    tests/test_cuda_emulated.py), torch's values within rounding, and the same mask and
    statistics as without them (team path included: ORDER_SHAPES)."""
    for i, (shape, kind) in enumerate(ORDER_SHAPES + [((3, 1, 5, 4), "ties")]):
        y = _with_nonfinite(make_features(shape, kind, seed=50 + i, dtype=dtype))
        keep, stats, moments = lpl_ext.outlier_mask(y, return_stats=True, return_plane_moments=True)
        keep_only, moments_only = lpl_ext.outlier_mask(y, return_plane_moments=True)
        assert torch.equal(keep, lpl_ext.outlier_mask(y)) and torch.equal(keep_only, keep)
        assert _bits(stats) == _bits(lpl_ext.outlier_mask(y, return_stats=True)[1])
        assert moments.dtype == torch.float64 and moments.shape == (shape[0] * shape[1], 3)
        assert _bits(moments.reshape(-1)) == _bits(np.array(ordered_plane_moments(y, keep)).reshape(-1)), shape
        assert _bits(moments_only.reshape(-1)) == _bits(moments.reshape(-1))
        want = torch_plane_moments(y, keep)
        assert torch.equal(moments[:, 2], want[:, 2])  # counts: exact
        spread = want[:, 1].max().sqrt()
        torch.testing.assert_close(moments[:, 0], want[:, 0], rtol=0, atol=1e-12 * float(spread))
        torch.testing.assert_close(moments[:, 1], want[:, 1], rtol=1e-11, atol=0)
        moments_np = lpl_ext.outlier_mask(y.float().numpy() if dtype == torch.bfloat16 else y.numpy(),
                                          return_plane_moments=True)[1]
        if dtype != torch.bfloat16:  # (numpy has no bfloat16)
            np.testing.assert_array_equal(moments_np.view(np.uint64), moments.numpy().view(np.uint64))


def test_plane_moments_of_empty_layers_are_zeros():
    for shape in [(2, 3, 0, 4), (0, 3, 4, 4)]:
        keep, moments = lpl_ext.outlier_mask(torch.randn(shape), return_plane_moments=True)
        assert moments.shape == (shape[0] * shape[1], 3) and not moments.any()


def _thread_cases() -> list:
    return [(_with_nonfinite(make_features(shape, kind, seed=40 + i, dtype=dtype)), shape)
            for i, (shape, kind) in enumerate(ORDER_SHAPES + [((5, 3, 20, 30), "relu")]) for dtype in DTYPES]


def thread_case_results(cases_file: str) -> tuple[int, list]:
    """(the extension's OpenMP thread count, [(mask bytes, stats bits)] of every case saved in
    ``cases_file``; the inputs are made once, by the caller: torch's own ops that make them
    round differently with another thread count)."""
    results = [(keep.numpy().tobytes(), _bits(stats)) for keep, stats in
               (lpl_ext.outlier_mask(y, return_stats=True) for y in torch.load(cases_file))]
    return lpl_ext.build_info()["omp_max_threads"], results


def test_bits_do_not_depend_on_the_thread_count(tmp_path):
    """1, 2 and 3 OpenMP threads (planes spread over threads, or one plane split by bands
    of tiles over the team): the same masks and the same statistics, bit for bit. Each count
    runs in its own process, set both ways: torch.set_num_threads reaches the OpenMP runtime
    torch loaded (which the extension shares in a source build; torch's import caps it at the
    core count), OMP_NUM_THREADS the runtime a repaired wheel's extension carries itself
    (tests/dist_install_run.sh)."""
    cases = _thread_cases()
    cases_file = tmp_path / "cases.pt"
    torch.save([y for y, _ in cases], cases_file)
    results = {}
    for n in (1, 2, 3):
        out = tmp_path / f"threads{n}.pkl"
        code = (f"import pickle, sys, torch; torch.set_num_threads({n}); "
                f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_outlier_mask as t; "
                f"open({str(out)!r}, 'wb').write(pickle.dumps(t.thread_case_results({str(cases_file)!r})))")
        proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS=str(n)),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        threads, results[n] = pickle.loads(out.read_bytes())
        assert threads == n or not lpl_ext.build_info()["openmp"]
    for n in (2, 3):
        for (got, want), (_, shape) in zip(zip(results[n], results[1]), cases):
            assert got == want, (n, shape)


# ---------------------------------------------------------------- inputs

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_inputs(dtype):
    y = make_features((2, 2, 19, 23), "heavy", seed=12).numpy().astype(dtype)
    got = lpl_ext.outlier_mask(y)
    assert isinstance(got, np.ndarray) and got.dtype == np.bool_ and got.shape == y.shape
    want = ref_outlier_mask(torch.from_numpy(y)).numpy()
    np.testing.assert_array_equal(got, want)
    # non-contiguous and non-native byte order are converted first
    y_t = np.ascontiguousarray(y.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(lpl_ext.outlier_mask(y_t), want)
    y_be = y.astype(y.dtype.newbyteorder(">"))
    np.testing.assert_array_equal(lpl_ext.outlier_mask(y_be), want)


def test_non_contiguous_tensor():
    y = make_features((2, 3, 21, 17), "silu", seed=13)
    want = ref_outlier_mask(y)
    y_cl = y.to(memory_format=torch.channels_last)
    assert_same_mask(lpl_ext.outlier_mask(y_cl), want)
    y_t = y.transpose(2, 3).contiguous().transpose(2, 3)
    assert_same_mask(lpl_ext.outlier_mask(y_t), want)


def test_empty_layer():
    keep, stats = lpl_ext.outlier_mask(torch.zeros(0, 3, 4, 4), return_stats=True)
    assert keep.shape == (0, 3, 4, 4)
    assert all(math.isnan(float(s)) for s in stats)


def test_outlier_windows():
    assert lpl_ext.outlier_windows(1) == (3, 5)
    assert lpl_ext.outlier_windows(2) == (1, 3)
    for d in range(1, 9):
        assert lpl_ext.outlier_windows(d) == ref_outlier_windows(d)
    with pytest.raises(ValueError, match="down_factor"):
        lpl_ext.outlier_windows(0)
    with pytest.raises(TypeError, match="down_factor"):
        lpl_ext.outlier_windows(1.5)


def test_bad_inputs():
    y = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="y: expected a 4-D"):
        lpl_ext.outlier_mask(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="y: expected a 4-D"):
        lpl_ext.outlier_mask(np.zeros((8, 8), np.float32))
    with pytest.raises(TypeError, match="y"):
        lpl_ext.outlier_mask(torch.zeros(1, 1, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="y"):
        lpl_ext.outlier_mask(np.zeros((1, 1, 4, 4), np.int64))
    with pytest.raises(TypeError, match="y"):
        lpl_ext.outlier_mask([[[[1.0]]]])
    for q in (0.0, 0.5, -0.1, 0.7, math.nan, math.inf):
        with pytest.raises(ValueError, match="quantile"):
            lpl_ext.outlier_mask(y, quantile=q)
    for m in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="margin_std"):
            lpl_ext.outlier_mask(y, margin_std=m)
    for name in ("closing", "opening"):
        for k in (0, -1, -3, 2, 4):
            with pytest.raises(ValueError, match=name):
                lpl_ext.outlier_mask(y, **{name: k})
        with pytest.raises(TypeError, match=name):
            lpl_ext.outlier_mask(y, **{name: 3.0})
    with pytest.raises(TypeError, match="quantile"):
        lpl_ext.outlier_mask(y, quantile="0.02")


def test_c_entry_point_validates():
    """The C entry point checks arguments itself (ValueError naming the argument)."""
    from lpl_ext import _C

    y = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
    keep = np.empty(y.shape, np.bool_)
    stats = np.empty(3, np.float64)
    _C.outlier_mask(y, keep, stats, 0.02, 2.0, 3, 5)
    cases = [((0.5, 2.0, 3, 5), "quantile"), ((0.0, 2.0, 3, 5), "quantile"), ((0.02, -1.0, 3, 5), "margin_std"),
             ((0.02, math.nan, 3, 5), "margin_std"), ((0.02, 2.0, 2, 5), "closing"), ((0.02, 2.0, 3, 0), "opening"),
             ((0.02, 2.0, -1, 5), "closing")]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            _C.outlier_mask(y, keep, stats, *args)
    with pytest.raises(ValueError, match="keep"):
        _C.outlier_mask(y, np.empty((1, 1, 4, 5), np.bool_), stats, 0.02, 2.0, 3, 5)
    with pytest.raises(TypeError, match="keep"):
        _C.outlier_mask(y, np.empty(y.shape, np.float32), stats, 0.02, 2.0, 3, 5)
    with pytest.raises(ValueError, match="stats"):
        _C.outlier_mask(y, keep, np.empty(4, np.float64), 0.02, 2.0, 3, 5)
    with pytest.raises(TypeError, match="stats"):
        _C.outlier_mask(y, keep, np.empty(3, np.float32), 0.02, 2.0, 3, 5)
    assert _C.outlier_mask_workspace_bytes(2, 3, 64, 64) >= 2 * 3 * 64 * 64
    with pytest.raises(ValueError):
        _C.outlier_mask_workspace_bytes(-1, 3, 4, 4)


def test_cuda_tensors_the_call_cannot_run_are_refused():
    """CUDA tensors handed to the C entry point without what a CUDA launch needs (the
    stream, the loaded kernels, the workspace) raise a Python exception naming CUDA, before
    any memory is touched, in every build (with or without CUDA kernels).
    No GPU is needed: DLPack capsules that label host memory as CUDA stand in for device
    tensors, and nothing may read or write through them."""
    from lpl_ext import _C
    from test_fuzz import DL_CODES, make_capsule

    hold: list = []
    y = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    keep = np.zeros(y.shape, np.bool_)
    stats = np.full(3, -7.0)
    y_cuda = make_capsule(hold, y.ctypes.data, list(y.shape), None, *DL_CODES["float32"], device=2)
    keep_cuda = make_capsule(hold, keep.ctypes.data, list(keep.shape), None, *DL_CODES["bool"], device=2)
    stats_cuda = make_capsule(hold, stats.ctypes.data, [3], None, *DL_CODES["float64"], device=2)
    for stats_arg in (None, stats_cuda):
        with pytest.raises((RuntimeError, ValueError), match="(?i)cuda"):
            _C.outlier_mask(y_cuda, keep_cuda, stats_arg, 0.02, 2.0, 3, 5)
    assert not keep.any() and np.all(stats == -7.0)  # nothing written
    if torch.cuda.is_available() and not lpl_ext.build_info()["cuda"]:
        # a GPU machine with a build that has no CUDA kernels: the public function says so
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            lpl_ext.outlier_mask(torch.randn(1, 1, 8, 8, device="cuda"))


# ---------------------------------------------------------------- CUDA

@pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)
class TestCuda:
    """CUDA results bit-identical to the CPU kernels (masks) and statistics on device."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
    @pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 3, 5), (1, 2, 7, 7), (2, 3, 64, 64), (1, 1, 300, 257)],
                             ids=lambda s: "x".join(map(str, s)))
    def test_matches_cpu(self, dtype, shape):
        for kind in KINDS:
            y = make_features(shape, kind, seed=21, dtype=dtype)
            y.view(-1)[:: max(1, y.numel() // 7)] = math.nan
            for closing, opening in [(3, 5), (1, 3), (7, 1)]:
                cpu_keep, cpu_stats = lpl_ext.outlier_mask(y, closing=closing, opening=opening, return_stats=True)
                gpu_keep, gpu_stats = lpl_ext.outlier_mask(y.cuda(), closing=closing, opening=opening,
                                                           return_stats=True)
                assert gpu_keep.is_cuda and gpu_stats.mean.is_cuda
                assert_same_mask(gpu_keep.cpu(), cpu_keep)
                np.testing.assert_allclose([float(s) for s in gpu_stats], [float(s) for s in cpu_stats],
                                           rtol=1e-10, atol=1e-12)

    def test_constant_and_non_finite_planes(self):
        y = make_features((1, 4, 40, 40), "heavy", seed=22)
        y[0, 0] = 0.1
        y[0, 1] = math.nan
        y[0, 2, :, :5] = math.inf
        assert_same_mask(lpl_ext.outlier_mask(y.cuda()).cpu(), lpl_ext.outlier_mask(y))

    def test_reference_vectors(self):
        for case in _outlier_cases():
            data = np.load(DATA / case["file"])
            got = lpl_ext.outlier_mask(torch.from_numpy(data["y"]).cuda(), closing=case["closing"],
                                       opening=case["opening"])
            assert_same_mask(got.cpu(), torch.from_numpy(data["keep"]))

    def test_no_host_sync_and_stream(self):
        """On a side stream, with torch's sync debug mode raising on any host sync: the
        mask and statistics are those of the CPU kernels."""
        y = make_features((2, 8, 128, 128), "spiky", seed=23).cuda()  # written on the current stream
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # y is complete before the side stream reads it
        with torch.cuda.stream(stream):
            torch.cuda.set_sync_debug_mode("error")
            try:
                keep, stats = lpl_ext.outlier_mask(y, return_stats=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(stream)  # the results come from the side stream
        want_keep, want_stats = lpl_ext.outlier_mask(y.cpu(), return_stats=True)
        assert_same_mask(keep.cpu(), want_keep)
        # one reduction order on both (csrc/lpl_kernel_abi.h): the same bits
        assert _bits(float(s) for s in stats) == _bits(float(s) for s in want_stats)
