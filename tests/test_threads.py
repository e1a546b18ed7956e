"""Thread safety (docs/reliability.md, "Thread safety"): the C entry points release the GIL, so calls from
several Python threads really run at the same time, each with its own OpenMP team. They
must give bit-identical results to serial calls (the kernels are deterministic for a
given OpenMP thread count), raise the same errors, and never disturb one another."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest
import torch

import lpl_ext
from lpl_ext import _C

THREADS = 6
REPEATS = 4


def _fd_numpy(x: np.ndarray, y: np.ndarray, mask: Any, norm: str, distance: str) -> Callable[[], Any]:
    def job() -> Any:
        return lpl_ext.feature_distance(x, y, mask, norm=norm, distance=distance, weight=0.5)
    return job


def _fd_torch_grad(x: torch.Tensor, y: torch.Tensor, mask: Any, norm: str, distance: str) -> Callable[[], Any]:
    def job() -> Any:
        xr = x.clone().requires_grad_(True)
        loss = lpl_ext.feature_distance(xr, y, mask, norm=norm, distance=distance)
        (g,) = torch.autograd.grad(loss.sum(), xr)
        return loss.detach(), g
    return job


def _fd_raw(x: np.ndarray, y: np.ndarray, norm: str) -> Callable[[], Any]:
    """_C directly, with its own output arrays (loss and grad written by the kernel)."""
    def job() -> Any:
        loss = np.empty(x.shape[0])
        grad = np.empty_like(x)
        _C.feature_distance(x, y, None, loss, grad, norm, "mse", 1.0, 0, None)
        return loss, grad
    return job


def _om(y: Any, closing: int, opening: int) -> Callable[[], Any]:
    def job() -> Any:
        keep, stats = lpl_ext.outlier_mask(y, closing=closing, opening=opening, return_stats=True)
        return keep, tuple(stats)
    return job


def _raises(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A call that must fail: its result is the exception's type and message."""
    def job() -> Any:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - compared as a value
            return ("raised", type(exc).__name__, str(exc))
        return ("did not raise",)
    return job


def _jobs() -> List[Tuple[str, Callable[[], Any]]]:
    g = torch.Generator().manual_seed(1234)
    jobs: List[Tuple[str, Callable[[], Any]]] = []
    # sizes from tiny to several tiles per plane, so the OpenMP work split differs
    for i, shape in enumerate([(2, 3, 5, 7), (3, 16, 24, 24), (1, 64, 48, 40), (4, 8, 96, 96)]):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = torch.randn(shape, generator=g).to(dtype)
            y = torch.randn(shape, generator=g).to(dtype)
            mask = torch.rand(shape, generator=g) > 0.1 if i % 2 else None
            norm = ["default", "shared", "batch", "none"][(i + int(dtype.itemsize)) % 4]
            jobs.append((f"fd torch {shape} {dtype} {norm}", _fd_torch_grad(x, y, mask, norm, "mse" if i % 2 else "l1")))
            if dtype != torch.bfloat16:
                xn, yn = x.numpy(), y.numpy()
                mn = None if mask is None else mask.numpy()
                jobs.append((f"fd numpy {shape} {dtype} {norm}", _fd_numpy(xn, yn, mn, norm, "mse")))
                jobs.append((f"fd raw {shape} {dtype}", _fd_raw(xn, yn, ["shared", "default"][i % 2])))
    # outlier mask: many small planes (planes split over threads) and a few large ones
    # (the whole team on one plane, split by rows)
    for shape in [(2, 4, 12, 12), (1, 2, 160, 160), (2, 64, 32, 32), (1, 1, 256, 300)]:
        for dtype in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
            y = torch.randn(shape, generator=g).to(dtype)
            y.view(-1)[:: 97] *= 50.0  # outliers
            jobs.append((f"om torch {shape} {dtype}", _om(y, 3, 5)))
            if dtype != torch.bfloat16:
                jobs.append((f"om numpy {shape} {dtype}", _om(y.numpy(), 1, 3)))
    # errors raised concurrently must not leak into other threads' calls
    x = np.zeros((2, 3, 4, 4), np.float32)
    jobs.append(("fd shape mismatch", _raises(lambda: lpl_ext.feature_distance(x, x[:1]))))
    jobs.append(("fd bad norm", _raises(lambda: _C.feature_distance(x, x, None, np.zeros(2), None, "l2", "mse", 1.0))))
    jobs.append(("fd readonly loss", _raises(
        lambda: _C.feature_distance(x, x, None, _readonly(np.zeros(2)), None, "shared", "mse", 1.0))))
    jobs.append(("om bad quantile", _raises(lambda: lpl_ext.outlier_mask(x, quantile=0.7))))
    jobs.append(("om int dtype", _raises(lambda: lpl_ext.outlier_mask(x.astype(np.int32)))))
    return jobs


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _assert_same(name: str, a: Any, b: Any) -> None:
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), name
        for u, v in zip(a, b):
            _assert_same(name, u, v)
        return
    if isinstance(a, torch.Tensor):
        a, b = a.float().numpy() if a.dtype == torch.bfloat16 else a.numpy(), \
            b.float().numpy() if b.dtype == torch.bfloat16 else b.numpy()
    if isinstance(a, (np.ndarray, np.generic)):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert np.asarray(a).dtype == np.asarray(b).dtype, name
        return
    assert a == b, name


def test_concurrent_calls_match_serial() -> None:
    """Every job run REPEATS times from THREADS threads at once, in shuffled order, gives
    bit-identical results to its serial run."""
    jobs = _jobs()
    serial = [fn() for _, fn in jobs]
    for (name, _), out in zip(jobs, serial):
        if name.startswith(("fd shape", "fd bad", "fd readonly", "om bad", "om int")):
            assert out[0] == "raised", (name, out)
    order = [i for i in range(len(jobs)) for _ in range(REPEATS)]
    random.Random(7).shuffle(order)
    start = threading.Barrier(THREADS)

    def worker(chunk: List[int]) -> List[Tuple[int, Any]]:
        start.wait()  # all threads enter the C code together
        return [(i, jobs[i][1]()) for i in chunk]

    chunks = [order[t::THREADS] for t in range(THREADS)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = [r for part in pool.map(worker, chunks) for r in part]
    assert len(results) == len(order)
    for i, out in results:
        _assert_same(jobs[i][0], out, serial[i])


@pytest.mark.parametrize("entry", ["feature_distance", "outlier_mask"])
def test_shared_inputs_distinct_outputs(entry: str) -> None:
    """Many threads reading the same input arrays at once, each writing its own outputs
    (the raw _C entry points, no Python-side copies)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 32, 64, 64)).astype(np.float32)
    y = rng.standard_normal((2, 32, 64, 64)).astype(np.float32)
    x.flags.writeable = False
    y.flags.writeable = False

    def call() -> Tuple[np.ndarray, ...]:
        if entry == "feature_distance":
            loss, grad = np.empty(2), np.empty_like(x)
            _C.feature_distance(x, y, None, loss, grad, "default", "l1", 1.0)
            return loss, grad
        keep, stats = np.empty(y.shape, np.uint8), np.empty(3)
        _C.outlier_mask(y, keep, stats, 0.02, 2.0, 3, 5)
        return keep, stats

    want = call()
    start = threading.Barrier(THREADS)

    def worker(_: int) -> List[Tuple[np.ndarray, ...]]:
        start.wait()
        return [call() for _ in range(3)]

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for outs in pool.map(worker, range(THREADS)):
            for got in outs:
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)
