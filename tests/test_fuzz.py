"""Fuzz of every ``lpl_ext._C`` entry point and of the public API (docs/reliability.md, "Argument checking
and fuzzing").

Every call must either return the correct result (checked against tests/reference.py in
float64) or raise a Python exception; none may crash the process. Each fuzz group runs in
a child process (this file run as a script), so a segfault, an abort or a sanitizer
report fails one test with the last case printed instead of killing pytest. The child
prints ``FUZZ-DONE group=G cases=N valid=V raised=R`` and the parent checks the counts.

Cases are drawn with a fixed seed per group: random shapes (zero-sized dimensions
included), dtypes (float32/64/16, bfloat16 through torch or hand-made DLPack capsules),
strides (transposed, stepped, negative, odd strides on size-1 dimensions), byte orders,
misaligned and read-only arrays, wrong argument counts and types, hand-made DLPack
capsules with broken fields, and huge shapes faked with stride-0 ``as_strided`` views
(products far past 2^31 that the C side must reject without touching memory).

Run groups by hand: ``python tests/test_fuzz.py fd_valid,fd_args [seed]``.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

# Exceptions a rejected call may raise (anything else, e.g. SystemError, is a bug).
ALLOWED_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError, MemoryError, BufferError)

# group -> (cases, minimum that must have run, minimum that must have been valid). Most
# cases are predicted valid or invalid; where a group has cases that may go either way
# (fd_args, fd_dlpack, workspace_*: junk values whose acceptance is not pinned), the fixed
# seed gives 52, 140, 86 and 47 valid cases and the minimums sit ~10% below, so that a
# kernel that starts rejecting good input (or a generator that stops producing it) fails.
GROUPS = {
    "fd_valid": (500, 500, 500),
    "fd_layouts": (400, 400, 170),
    "fd_args": (300, 300, 45),
    "fd_dlpack": (400, 400, 125),
    "fd_public": (250, 250, 250),
    "workspace_fd": (150, 150, 75),
    "workspace_om": (150, 150, 40),
    "om_valid": (300, 300, 300),
    "om_bad": (300, 300, 65),
    "om_public": (150, 150, 150),
}
# groups run by one child process each (one torch import per child, not per group)
CHILDREN = {
    "feature_distance": ["fd_valid", "fd_layouts", "fd_args", "fd_dlpack", "fd_public"],
    "outlier_mask": ["om_valid", "om_bad", "om_public"],
    "workspace_sizes": ["workspace_fd", "workspace_om"],
}
SEED = 20260707


class CaseFailure(AssertionError):
    """A fuzz case returned a wrong result or raised where it must succeed."""


# ======================================================================================
# child side
# ======================================================================================

class Fuzz:
    """Runs cases, counts outcomes, reports the failing case."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.cases = 0
        self.valid = 0
        self.raised = 0
        self.skipped = 0

    def run(self, desc: str, expect: str, call: Callable[[], Any], check: Optional[Callable[[Any], None]]) -> None:
        """expect: 'valid' (must succeed and pass check), 'invalid' (must raise one of
        ALLOWED_ERRORS), 'either' (raise, or succeed and pass check)."""
        self.cases += 1
        print(f"case {self.cases}: {expect}: {desc}", flush=True)
        try:
            out = call()
        except ALLOWED_ERRORS as exc:
            if expect == "valid":
                raise CaseFailure(f"valid case raised {type(exc).__name__}: {exc}") from exc
            self.raised += 1
            return
        except Exception as exc:  # noqa: BLE001 - any other type is a bug in the entry point
            raise CaseFailure(f"unexpected exception type {type(exc).__name__}: {exc}") from exc
        if expect == "invalid":
            raise CaseFailure("invalid case did not raise")
        if check is not None:
            check(out)
        self.valid += 1


# ---- data helpers ---------------------------------------------------------------------

def _torch():
    import torch

    return torch


def bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float64 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def f64_to_bf16_bits(v: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bit patterns (round to nearest even through torch)."""
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def rand_shape(rng: np.random.Generator, zero_prob: float = 0.12, big_prob: float = 0.08) -> tuple:
    if rng.random() < big_prob:
        # large enough for the multi-threaded paths (>= 2^16 values, several pixel tiles)
        return (int(rng.integers(1, 4)), int(rng.integers(2, 9)), int(rng.integers(64, 140)), int(rng.integers(64, 140)))
    dims = [int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 10)), int(rng.integers(1, 10))]
    for i in range(4):
        if rng.random() < zero_prob:
            dims[i] = 0
    return tuple(dims)


def rand_values(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """float64 features with a random scale, sometimes with ties or exact zeros."""
    scale = float(rng.choice([1.0, 1e-2, 30.0]))
    v = rng.standard_normal(shape) * scale
    r = rng.random()
    if r < 0.1 and v.size:
        v = np.round(v)  # many ties
    return v


def tolerances(dtype: str) -> tuple:
    """(loss rtol, grad rtol relative to max |grad|)."""
    return {"float64": (1e-10, 1e-9), "float32": (5e-4, 2e-4), "float16": (5e-4, 2e-3),
            "bfloat16": (5e-4, 1.6e-2)}[dtype]


def ref_fd(x64: np.ndarray, y64: np.ndarray, m: Optional[np.ndarray], norm: str, dist: str, w: float,
           need_grad: bool) -> tuple:
    """float64 oracle: (loss (N,), grad or None)."""
    torch = _torch()
    from reference import ref_feature_distance

    xt = torch.from_numpy(np.array(x64, dtype=np.float64)).requires_grad_(need_grad)
    yt = torch.from_numpy(np.array(y64, dtype=np.float64))
    mt = None if m is None else torch.from_numpy(np.array(m) != 0)
    if x64.shape[1] == 0:
        # No channels: every sum is empty and lpl_ext returns 0 (torch's mean over zero
        # channels would be NaN).
        return np.zeros(x64.shape[0]), (np.zeros(x64.shape) if need_grad else None)
    loss = ref_feature_distance(xt, yt, mt, norm=norm, distance=dist, weight=w)
    grad = None
    if need_grad:
        (grad,) = torch.autograd.grad(loss.sum(), xt, allow_unused=True) if loss.numel() else (None,)
        grad = np.zeros(x64.shape) if grad is None else grad.numpy()
    return loss.detach().numpy(), grad


def assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise CaseFailure(f"{name}: shape {got.shape} != {want.shape}")
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    if not np.array_equal(nan_g, nan_w):
        raise CaseFailure(f"{name}: NaN pattern differs: got {got.ravel()[:8]} want {want.ravel()[:8]}")
    inf_w = np.isinf(want)
    if not np.array_equal(got[inf_w], want[inf_w]):
        raise CaseFailure(f"{name}: infinities differ")
    fin = ~nan_w & ~inf_w
    err = np.abs(got[fin] - want[fin])
    lim = np.broadcast_to(np.asarray(atol, dtype=np.float64), want.shape)[fin] + rtol * np.abs(want[fin])
    if err.size and np.any(err > lim):
        i = int(np.argmax(err - lim))
        raise CaseFailure(f"{name}: max error {err[i]:.3e} > {lim[i]:.3e} (got {got[fin][i]!r}, want {want[fin][i]!r})")


def storage(rng: np.random.Generator, v64: np.ndarray, dtype: str) -> tuple:
    """(array in the storage dtype as numpy (bf16 as uint16 bits), its exact float64 values)."""
    if dtype == "bfloat16":
        bits = f64_to_bf16_bits(v64)
        return bits, bf16_bits_to_f64(bits)
    a = v64.astype(dtype)
    return a, a.astype(np.float64)


def as_torch(a: np.ndarray, dtype: str):
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def rand_mask(rng: np.random.Generator, shape: tuple) -> Optional[np.ndarray]:
    r = rng.random()
    if r < 0.3:
        return None
    p = float(rng.choice([0.0, 0.3, 0.8, 1.0]))
    keep = rng.random(shape) < p
    if r < 0.65:
        return keep
    # uint8 mask whose kept values are any nonzero byte
    return (keep * rng.integers(1, 256, shape)).astype(np.uint8)


def fd_inputs(rng: np.random.Generator, dtype: str, shape: Optional[tuple] = None) -> dict:
    shape = shape if shape is not None else rand_shape(rng)
    x64 = rand_values(rng, shape)
    y64 = rand_values(rng, shape)
    if rng.random() < 0.08:
        y64 = x64.copy()  # distance exactly 0 (l1 subgradient 0)
    if rng.random() < 0.05:
        y64 = np.zeros(shape)
    xs, x64 = storage(rng, x64, dtype)
    ys, y64 = storage(rng, y64, dtype)
    norm = str(rng.choice(["default", "shared", "batch", "none"]))
    if norm == "default" and x64.size:
        # keep every pixel column of x away from 0 (torch's sqrt backward is NaN there,
        # lpl_ext uses the 0 subgradient like torch.linalg.norm; tested elsewhere)
        col = np.sqrt((x64 ** 2).sum(1, keepdims=True))
        if np.any(col == 0):
            xs, x64 = storage(rng, x64 + 0.5, dtype)
    return dict(shape=shape, dtype=dtype, xs=xs, ys=ys, x64=x64, y64=y64, mask=rand_mask(rng, shape),
                norm=norm, dist=str(rng.choice(["mse", "l1"])),
                weight=float(rng.choice([1.0, 0.5, 0.125, 0.0, -2.0, 3.7])))


def grad_term_scale(case: dict) -> float:
    """Bound on the size of the terms the gradient is summed from. With norm="default"
    the gradient r*g - (r^2/|x|) x sum_c g_c x_c cancels (to exactly 0 with one channel),
    so its error is relative to these terms, not to the result."""
    x64, m = case["x64"], case["mask"]
    n, c = x64.shape[:2]
    if x64.size == 0:
        return 0.0
    kept = np.full((n, c), float(x64.shape[2] * x64.shape[3])) if m is None else (np.asarray(m) != 0).sum((2, 3))
    kept = kept[kept > 0]
    if kept.size == 0:
        return 0.0
    coef = abs(case["weight"]) / (c * kept.min())
    col = np.sqrt((x64 ** 2).sum(1)).min()
    return 4.0 * coef / max(col, 1e-300)


def round_to(v: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as the storage dtype would hold them (overflow to inf included)."""
    if dtype == "float64":
        return v
    if dtype == "bfloat16":
        return bf16_bits_to_f64(f64_to_bf16_bits(v))
    with np.errstate(over="ignore"):
        return v.astype(dtype).astype(np.float64)


def loss_condition(case: dict) -> np.ndarray:
    """(N,) bound on the size of what each sample's loss sums: the loss evaluated with
    |x_n| + |y_n| in place of x_n - y_n. Rounding errors are relative to it (the loss
    itself can cancel to ~0, e.g. norm="default" with one channel)."""
    x, y, m = case["x64"], case["y64"], case["mask"]
    n, c = x.shape[:2]
    if x.size == 0 or c == 0:
        return np.zeros(n)
    k = np.ones(x.shape) if m is None else (np.asarray(m) != 0).astype(np.float64)
    ym = y * k
    with np.errstate(all="ignore"):
        if case["norm"] == "default":
            xn = np.abs(x) / (np.sqrt((x ** 2).sum(1, keepdims=True)) + 1e-10)
            yn = np.abs(ym) / (np.sqrt((ym ** 2).sum(1, keepdims=True)) + 1e-10)
        elif case["norm"] == "shared":
            r = 1.0 / (np.sqrt((ym ** 2).sum(1, keepdims=True)) + 1e-6)
            xn, yn = np.abs(x) * r, np.abs(ym) * r
        elif case["norm"] == "batch":
            mean = ym.mean((0, 2, 3), keepdims=True)
            cnt = n * x.shape[2] * x.shape[3]
            std = np.sqrt(((ym - mean) ** 2).sum((0, 2, 3), keepdims=True) / max(cnt - 1, 1))
            xn, yn = (np.abs(x) + np.abs(mean)) / (std + 1e-6), (np.abs(ym) + np.abs(mean)) / (std + 1e-6)
        else:
            xn, yn = np.abs(x), np.abs(ym)
        e = (xn + yn) ** 2 if case["dist"] == "mse" else xn + yn
        s = (e * k).sum((2, 3))
        kept = k.sum((2, 3))
        term = np.where(kept > 0, abs(case["weight"]) * s / np.maximum(kept, 1), 0.0)
    return term.mean(1)


def check_fd(case: dict, loss: np.ndarray, grad: Optional[np.ndarray], loss_in_dtype: bool = False) -> None:
    """loss (N,) and grad (x's shape) as float64 against the oracle; loss_in_dtype: the
    loss was returned in x's dtype (public API) rather than float64."""
    want_loss, want_grad = ref_fd(case["x64"], case["y64"], case["mask"], case["norm"], case["dist"],
                                  case["weight"], grad is not None)
    lr, gr = tolerances(case["dtype"])
    if loss_in_dtype:
        want_loss = round_to(want_loss, case["dtype"])
        lr = {"float64": 1e-10, "float32": 5e-4, "float16": 1.5e-3, "bfloat16": 1e-2}[case["dtype"]]
    cond = loss_condition(case)
    assert_close("loss", loss, want_loss, lr, lr * np.where(np.isfinite(cond), cond, 0.0) + 1e-300)
    if grad is not None:
        # the correct gradient is the exact one rounded to the storage dtype (a value past
        # float16's range is inf there)
        want_grad = round_to(want_grad, case["dtype"])
        gscale = float(np.nanmax(np.abs(want_grad[np.isfinite(want_grad)]), initial=0.0))
        if case["norm"] == "default":
            gscale = max(gscale, grad_term_scale(case) * (1e-6 if case["dtype"] == "float64" else 1.0))
        sub = {"float16": 6e-8, "bfloat16": 1e-38}.get(case["dtype"], 0.0)
        assert_close("grad", grad, want_grad, gr, gr * gscale + sub + 1e-300)


def describe(case: dict) -> str:
    m = case["mask"]
    md = "None" if m is None else str(m.dtype)
    return (f"shape={case['shape']} dtype={case['dtype']} mask={md} norm={case['norm']} "
            f"dist={case['dist']} w={case['weight']}")


# ---- group: fd_valid --------------------------------------------------------------------

def group_fd_valid(fz: Fuzz, ncases: int) -> None:
    """Valid calls of _C.feature_distance, numpy and torch (DLPack) arguments."""
    from lpl_ext import _C

    torch = _torch()
    rng = fz.rng
    while fz.cases < ncases:
        dtype = str(rng.choice(["float32", "float64", "float16", "bfloat16"]))
        case = fd_inputs(rng, dtype)
        shape = case["shape"]
        use_torch = dtype == "bfloat16" or rng.random() < 0.4
        want_grad = rng.random() < 0.6
        if use_torch:
            torch_dtype = getattr(torch, dtype)
            xt, yt = as_torch(case["xs"], dtype), as_torch(case["ys"], dtype)
            mt = None if case["mask"] is None else torch.from_numpy(case["mask"])
            loss_t = torch.full((shape[0],), -7.0, dtype=torch.float64)
            grad_t = torch.full(shape, -7.0, dtype=torch_dtype) if want_grad else None
            # capsules and __dlpack__ objects both
            wrap = (lambda t: t) if rng.random() < 0.5 else (lambda t: torch.utils.dlpack.to_dlpack(t))

            def call(xt=xt, yt=yt, mt=mt, loss_t=loss_t, grad_t=grad_t, wrap=wrap, case=case):
                _C.feature_distance(wrap(xt), wrap(yt), None if mt is None else wrap(mt), wrap(loss_t),
                                    None if grad_t is None else wrap(grad_t), case["norm"], case["dist"],
                                    case["weight"])
                g = None if grad_t is None else grad_t.to(torch.float64).numpy()
                return loss_t.numpy(), g
        else:
            loss = np.full(shape[0], -7.0)
            grad = np.full(shape, -7.0, dtype=dtype) if want_grad else None

            def call(loss=loss, grad=grad, case=case):
                _C.feature_distance(case["xs"], case["ys"], case["mask"], loss, grad, case["norm"],
                                    case["dist"], case["weight"], 0, None)
                return loss, grad
        fz.run(describe(case) + f" torch={use_torch} grad={want_grad}", "valid", call,
               lambda out, case=case: check_fd(case, out[0], out[1]))


# ---- group: fd_layouts ------------------------------------------------------------------

LAYOUTS = ["contig", "fortran", "step", "flip", "byteswap", "misaligned", "readonly", "size1_strides", "transposed"]
# layouts the C entry points always accept for inputs (outputs: not "readonly")
PLAIN_LAYOUTS = ["contig", "readonly", "size1_strides"]


def relayout(rng: np.random.Generator, a: np.ndarray, kinds: Optional[list] = None) -> tuple:
    """A view or copy of `a` with the same values in an unusual memory layout, drawn from
    `kinds` (default: all of LAYOUTS). Returns (array, kind); ``accepted`` says whether the
    C side takes it."""
    kind = str(rng.choice(kinds or LAYOUTS))
    if kind == "contig":
        return np.ascontiguousarray(a), kind
    if kind == "fortran":
        return np.asfortranarray(a), kind
    if kind == "step":
        big = np.zeros(a.shape[:-1] + (a.shape[-1] * 2,), a.dtype)
        big[..., ::2] = a
        return big[..., ::2], kind
    if kind == "flip":
        f = np.ascontiguousarray(a[:, :, ::-1])
        return f[:, :, ::-1], kind
    if kind == "byteswap":
        return a.astype(a.dtype.newbyteorder("S")), kind
    if kind == "misaligned":
        if a.dtype.itemsize == 1:
            return np.ascontiguousarray(a), "contig"
        buf = np.zeros(a.nbytes + 1, np.uint8)
        m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        m[...] = a
        return m, kind
    if kind == "readonly":
        r = np.ascontiguousarray(a).copy()
        r.flags.writeable = False
        return r, kind
    if kind == "size1_strides":
        # dimensions of size 1 may carry any stride: still a valid C-contiguous layout
        c = np.ascontiguousarray(a)
        strides = tuple(s if d != 1 else int(rng.integers(-5, 100)) * c.itemsize for d, s in zip(c.shape, c.strides))
        return np.lib.stride_tricks.as_strided(c, c.shape, strides), kind
    t = np.ascontiguousarray(np.swapaxes(a, 2, 3))
    return np.swapaxes(t, 2, 3), kind


def c_contiguous(a: np.ndarray) -> bool:
    """C-contiguous as docs/reliability.md states the contract: element strides of a row-major
    array, any stride on a size-1 dimension, any strides at all without elements."""
    if a.size == 0:
        return True
    expected = a.itemsize
    for dim, stride in zip(reversed(a.shape), reversed(a.strides)):
        if dim != 1 and stride != expected:
            return False
        expected *= dim
    return True


def accepted(a: Any, dtypes: tuple, output: bool = False) -> bool:
    """Whether a C entry point takes numpy array `a` (docs/reliability.md, "Argument checking and fuzzing"): one of
    `dtypes`, native byte order, aligned, C-contiguous, writeable when it is an output."""
    return (isinstance(a, np.ndarray) and a.dtype.newbyteorder("=") in [np.dtype(d) for d in dtypes]
            and (a.dtype.isnative or a.dtype.itemsize == 1) and a.flags.aligned and c_contiguous(a)
            and (a.flags.writeable or not output))


def group_fd_layouts(fz: Fuzz, ncases: int) -> None:
    """_C.feature_distance with numpy arguments in every layout: accepted only when the
    result is right, rejected otherwise; huge stride-0 shapes always rejected."""
    from lpl_ext import _C

    rng = fz.rng
    while fz.cases < ncases:
        r = rng.random()
        if r < 0.15:
            # huge fake shapes: products far beyond 2^31 with no memory behind them
            dtype = str(rng.choice(["float32", "float16", "float64"]))
            big = [int(rng.choice([1, 2, 3, 2**16 + 1, 2**20, 2**31 + 7, 2**33])) for _ in range(4)]
            nbytes_max = np.iinfo(np.intp).max // np.dtype(dtype).itemsize
            while math.prod(big) > nbytes_max:
                big[int(rng.integers(0, 4))] = 1
            if math.prod(big) <= 2**31:
                big[3] = 2**31 + 7
                while math.prod(big) > nbytes_max:
                    big[0] = 1
                    big[1] = 1
            base = np.zeros(1, dtype)
            huge = np.lib.stride_tricks.as_strided(base, tuple(big), (0, 0, 0, 0))
            small = np.zeros(tuple(min(b, 2) for b in big), dtype)
            which = str(rng.choice(["x", "y", "mask", "grad", "xy"]))
            loss = np.lib.stride_tricks.as_strided(np.zeros(1), (big[0] if which in ("x", "xy") else small.shape[0],), (0,))
            x = huge if which in ("x", "xy") else small
            y = huge if which in ("y", "xy") else small
            mask = np.lib.stride_tricks.as_strided(np.ones(1, bool), tuple(big), (0,) * 4) if which == "mask" else None
            grad = huge if which == "grad" else None
            if which == "grad" and rng.random() < 0.5:
                huge.flags.writeable = False
            fz.run(f"huge stride-0 {which} shape={tuple(big)} {dtype}", "invalid",
                   lambda x=x, y=y, mask=mask, loss=loss, grad=grad: _C.feature_distance(
                       x, y, mask, loss, grad, "shared", "mse", 1.0), None)
            continue
        dtype = str(rng.choice(["float32", "float64", "float16"]))
        case = fd_inputs(rng, dtype)
        shape = case["shape"]
        # half of the cases in layouts that must be accepted, the rest in any layout
        plain = rng.random() < 0.5
        kinds = PLAIN_LAYOUTS if plain else None
        x, kx = relayout(rng, case["xs"], kinds)
        y, ky = relayout(rng, case["ys"], kinds)
        mask, km = (None, "none") if case["mask"] is None else relayout(rng, case["mask"], kinds)
        want_grad = rng.random() < 0.5
        loss = np.full(shape[0], -7.0)
        lk = "plain" if plain else str(rng.choice(["plain", "plain", "readonly", "float32", "step", "2d", "list",
                                                   "byteswap"]))
        if lk == "readonly":
            loss.flags.writeable = False
        elif lk == "float32":
            loss = loss.astype(np.float32)
        elif lk == "step":
            loss = np.full(2 * shape[0], -7.0)[::2]
        elif lk == "2d":
            loss = loss.reshape(-1, 1)
        elif lk == "list":
            loss = list(loss)
        elif lk == "byteswap":
            loss = loss.astype(loss.dtype.newbyteorder("S"))
        grad = None
        gk = "none"
        if want_grad:
            grad, gk = relayout(rng, np.full(shape, -7.0, dtype=dtype), ["contig", "size1_strides"] if plain else None)
        desc = describe(case) + f" x={kx} y={ky} mask={km} loss={lk} grad={gk}"
        ok = (accepted(x, (dtype,)) and accepted(y, (dtype,))
              and (mask is None or accepted(mask, ("bool", "uint8")))
              and accepted(loss, ("float64",), output=True) and np.ndim(loss) == 1
              and (grad is None or accepted(grad, (dtype,), output=True)))
        assert ok or not plain, desc

        def call(x=x, y=y, mask=mask, loss=loss, grad=grad, case=case):
            _C.feature_distance(x, y, mask, loss, grad, case["norm"], case["dist"], case["weight"])
            return np.array(loss, dtype=np.float64), None if grad is None else np.array(grad, dtype=np.float64)

        fz.run(desc, "valid" if ok else "invalid", call, lambda out, case=case: check_fd(case, out[0], out[1]))


# ---- group: fd_args ---------------------------------------------------------------------

class DLPackRaises:
    def __dlpack__(self, *args, **kwargs):
        raise RuntimeError("producer failed")


class DLPackNotCapsule:
    def __dlpack__(self, *args, **kwargs):
        return 42


class GetattrRaises:
    def __getattr__(self, name):
        raise KeyError(name)


def group_fd_args(fz: Fuzz, ncases: int) -> None:
    """Wrong argument counts, keywords, types and option values."""
    from lpl_ext import _C

    rng = fz.rng
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    good = [x, y, None, np.zeros(2), None, "shared", "mse", 1.0]
    junk = [None, 0, -1, 2**80, 1.5, float("nan"), "x", b"mse", "mse\x00junk", "\udcff", [1, 2],
            (x,), {}, object(), DLPackRaises(), DLPackNotCapsule(), GetattrRaises(), np.float32(1.0),
            np.zeros(()), np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4, 5), np.int32),
            np.zeros((2, 3, 4, 5), np.complex64), np.zeros((2, 3, 4, 5), object),
            np.zeros((1,) * 9, np.float32), np.zeros((2, 3, 4, 6), np.float32), np.zeros(3),
            np.zeros(2, np.float32), np.zeros((2, 3, 4, 5), np.float64), "MSE", "Shared", "",
            float("inf"), True, np.zeros((2, 3, 4, 5), "V4"), np.zeros((2, 3, 4, 5), np.uint16)]
    names = ["x", "y", "mask", "loss", "grad", "norm", "distance", "weight", "stream", "workspace"]
    while fz.cases < ncases:
        r = rng.random()
        args = list(good)
        kwargs: dict = {}
        if r < 0.15:
            k = int(rng.integers(0, 13))
            args = (args + [0, None, "extra", 1])[:k]
            desc = f"{k} positional arguments"
            # 8 required, then stream and workspace; an 11th (a later optional argument) either
            expect = "valid" if k in (8, 9, 10) else ("either" if k == 11 else "invalid")
        elif r < 0.3:
            # keywords: duplicates, unknown names, all by name
            mode = int(rng.integers(0, 3))
            if mode == 0:
                kwargs = dict(zip(names[:8], args))
                args = []
                desc, expect = "all keywords", "valid"
            elif mode == 1:
                kwargs = {str(rng.choice(names[:8])): x}
                desc, expect = f"duplicate keyword {list(kwargs)}", "invalid"
            else:
                kwargs = {"bogus": 1}
                desc, expect = "unknown keyword", "invalid"
        else:
            pos = int(rng.integers(0, 10))
            val = junk[int(rng.integers(0, len(junk)))]
            if pos < 8:
                args[pos] = val
            else:
                args = args + ([0] if pos == 9 else [])
                args.append(val)
            shown = val.shape if isinstance(val, np.ndarray) else repr(val)[:30]
            desc = f"{names[pos]}={type(val).__name__}:{shown}"
            expect = "either"
        loss = np.zeros(2)
        if len(args) > 3 and args[3] is good[3]:
            args[3] = loss

        def call(args=args, kwargs=kwargs):
            if "loss" in kwargs:
                kwargs["loss"] = np.zeros(2)
            return _C.feature_distance(*args, **kwargs)

        def check(out, args=args, kwargs=kwargs):
            # accepted junk must have been harmless (e.g. stream/workspace on CPU, weight
            # as numpy scalar, mask of uint8 zeros): the loss must still be the oracle's
            a = dict(zip(names, args))
            a.update(kwargs)
            xx, yy, mm, ll = a["x"], a["y"], a.get("mask"), a["loss"]
            if out is not None:
                raise CaseFailure(f"returned {out!r}, expected None")
            if not (isinstance(ll, np.ndarray) and ll.dtype == np.float64 and isinstance(xx, np.ndarray)):
                raise CaseFailure("accepted a call whose loss/x are not arrays")
            case = dict(x64=xx.astype(np.float64), y64=np.asarray(yy, np.float64), mask=mm, norm=a["norm"],
                        dist=a["distance"], weight=float(a["weight"]), dtype=str(xx.dtype))
            check_fd(case, ll, None)

        fz.run(desc, expect, call, check)


# ---- group: fd_dlpack (hand-made capsules) ----------------------------------------------

class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

DL_CODES = {"float32": (2, 32), "float64": (2, 64), "float16": (2, 16), "bfloat16": (4, 16),
            "bool": (6, 8), "uint8": (1, 8)}


def make_capsule(keep: list, data: Optional[int], shape: Optional[list], strides: Optional[list],
                 code: int, bits: int, lanes: int = 1, device: int = 1, device_id: int = 0,
                 byte_offset: int = 0, ndim: Optional[int] = None, versioned: bool = False,
                 readonly: bool = False, major: int = 1, name: bytes = b"") -> Any:
    """A DLPack capsule over memory the caller owns; every ctypes object it points to is
    appended to `keep` (the capsule has no destructor and must not outlive them)."""
    nd = len(shape) if (ndim is None and shape is not None) else (ndim or 0)
    shp = (ctypes.c_int64 * max(len(shape), 1))(*shape) if shape is not None else None
    strd = (ctypes.c_int64 * max(len(strides), 1))(*strides) if strides is not None else None
    dl = DLTensor(data, DLDevice(device, device_id), nd, DLDataType(code, bits, lanes),
                  ctypes.cast(shp, ctypes.POINTER(ctypes.c_int64)) if shp is not None else None,
                  ctypes.cast(strd, ctypes.POINTER(ctypes.c_int64)) if strd is not None else None,
                  byte_offset)
    if versioned:
        m = DLManagedTensorVersioned(DLPackVersion(major, 0), None, None, 1 if readonly else 0, dl)
        cname = name or b"dltensor_versioned"
    else:
        m = DLManagedTensor(dl, None, None)
        cname = name or b"dltensor"
    keep.extend([shp, strd, m, cname])
    return _capsule_new(ctypes.addressof(m), cname, None)


def capsule_of(keep: list, a: np.ndarray, dtype: str, rng: np.random.Generator, **kw: Any) -> Any:
    """Capsule over numpy array `a` (C-contiguous), strides given or NULL at random."""
    code, bits = DL_CODES[dtype]
    strides = None
    if rng.random() < 0.5:
        strides = [s // a.itemsize for s in a.strides] if a.size else [1] * a.ndim
    keep.append(a)
    return make_capsule(keep, a.ctypes.data, list(a.shape), strides, code, bits, **kw)


def group_fd_dlpack(fz: Fuzz, ncases: int) -> None:
    """feature_distance through hand-made DLPack capsules: valid ones give the right loss,
    broken ones (NULL shape/data, negative or overflowing shapes, odd dtypes, devices,
    versions, misalignment, read-only outputs, consumed capsules) raise."""
    from lpl_ext import _C

    rng = fz.rng
    while fz.cases < ncases:
        keep: list = []
        dtype = str(rng.choice(["float32", "float64", "float16", "bfloat16"]))
        case = fd_inputs(rng, dtype)
        shape = case["shape"]
        xs = np.ascontiguousarray(case["xs"])
        ys = np.ascontiguousarray(case["ys"])
        loss = np.full(shape[0], -7.0)
        want_grad = rng.random() < 0.4
        grad = np.full(shape, -7.0, dtype=xs.dtype) if want_grad else None
        mdt = None if case["mask"] is None else ("bool" if case["mask"].dtype == bool else "uint8")
        args = {
            "x": capsule_of(keep, xs, dtype, rng, versioned=rng.random() < 0.3, readonly=rng.random() < 0.3),
            "y": capsule_of(keep, ys, dtype, rng),
            "mask": None if mdt is None else capsule_of(keep, np.ascontiguousarray(case["mask"]), mdt, rng),
            "loss": capsule_of(keep, loss, "float64", rng, versioned=rng.random() < 0.3),
            "grad": None if grad is None else capsule_of(keep, grad, dtype, rng),
        }
        expect = "valid"
        desc = describe(case)
        if rng.random() < 0.7:
            expect = "invalid"
            target = str(rng.choice(["x", "y", "loss"] + (["mask"] if mdt else []) + (["grad"] if want_grad else [])))
            arr = {"x": xs, "y": ys, "loss": loss, "grad": grad, "mask": case["mask"]}[target]
            tdt = {"x": dtype, "y": dtype, "loss": "float64", "grad": dtype, "mask": mdt}[target]
            code, bits = DL_CODES[tdt]
            keep.append(arr)
            shp = list(arr.shape)
            flaw = str(rng.choice(["null_shape", "negative", "overflow", "null_data", "misaligned", "lanes",
                                   "int32", "float8", "complex", "device", "cuda", "ndim_neg", "ndim_big",
                                   "major", "readonly_out", "used", "badname", "noncontig", "huge_zero"]))
            kw: dict = {}
            data = arr.ctypes.data
            strides: Optional[list] = None
            if flaw == "null_shape":
                shp, kw["ndim"] = None, len(arr.shape)
            elif flaw == "negative":
                shp[int(rng.integers(0, len(shp)))] = -int(rng.integers(1, 2**62))
            elif flaw == "overflow":
                shp = [2**40 + 1] * len(shp) if len(shp) > 1 else [2**63 - 1]
                if len(shp) == 1:
                    expect = "invalid"
            elif flaw == "null_data":
                data = None
                if arr.size == 0:
                    expect = "valid"  # no element is ever addressed
            elif flaw == "misaligned":
                # the same values one byte into a larger buffer: byte_offset 1 is honest,
                # so a 1-byte dtype is valid there and wider ones are misaligned
                shifted = np.zeros(arr.nbytes + 1, np.uint8)
                shifted[1:] = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
                keep.append(shifted)
                data = shifted.ctypes.data
                kw["byte_offset"] = 1
                if arr.itemsize == 1 or arr.size == 0:
                    expect = "valid"
            elif flaw == "lanes":
                kw["lanes"] = 2
            elif flaw == "int32":
                code, bits = 0, 32
            elif flaw == "float8":
                code, bits = 2, 8
            elif flaw == "complex":
                code, bits = 5, 64
            elif flaw == "device":
                kw["device"] = int(rng.choice([3, 4, 7, 13, 999, -1]))
            elif flaw == "cuda":
                # a host pointer labelled CUDA: refused before any launch, since the call
                # passes neither the stream nor the kernels a CUDA tensor needs
                kw["device"] = 2
            elif flaw == "ndim_neg":
                kw["ndim"] = -int(rng.integers(1, 1000))
            elif flaw == "ndim_big":
                kw["ndim"] = int(rng.choice([9, 64, 2**31 - 1]))
            elif flaw == "major":
                kw.update(versioned=True, major=int(rng.choice([0, 2, 99])))
            elif flaw == "readonly_out":
                if target in ("loss", "grad"):
                    kw.update(versioned=True, readonly=True)
                else:
                    kw.update(versioned=True, readonly=True)
                    expect = "valid"
            elif flaw == "used":
                kw["name"] = b"used_dltensor"
            elif flaw == "badname":
                kw["name"] = b"not_a_tensor"
            elif flaw == "noncontig":
                strides = [int(s) for s in rng.integers(2, 9, len(shp))]
                if arr.size == 0 or all(d <= 1 for d in shp):
                    expect = "either"
            elif flaw == "huge_zero":
                # zero elements, the rest of the shape huge: valid but empty; NULL data
                if target == "loss" or arr.ndim != 4:
                    shp = [0] * len(shp)
                    expect = "invalid" if shape[0] != 0 else "either"
                else:
                    shp = [shp[0], shp[1], 0, 2**40]
                    expect = "invalid"  # shape no longer matches the others
                data = None
            args[target] = make_capsule(keep, data, shp, strides, code, bits, **kw)
            desc += f" capsule {target}: {flaw} {kw}"

        def call(args=args, loss=loss, grad=grad):
            _C.feature_distance(args["x"], args["y"], args["mask"], args["loss"], args["grad"],
                                case["norm"], case["dist"], case["weight"])
            g = None
            if grad is not None:
                g = bf16_bits_to_f64(grad) if dtype == "bfloat16" else grad.astype(np.float64)
            return loss.copy(), g

        fz.run(desc, expect, call, lambda out, case=case: check_fd(case, out[0], out[1]))
        del keep


# ---- group: fd_public --------------------------------------------------------------------

def group_fd_public(fz: Fuzz, ncases: int) -> None:
    """lpl_ext.feature_distance with numpy (any layout) and torch (any layout, autograd)."""
    import lpl_ext

    torch = _torch()
    rng = fz.rng
    while fz.cases < ncases:
        use_torch = rng.random() < 0.5
        dtype = str(rng.choice(["float32", "float64", "float16"] + (["bfloat16"] if use_torch else [])))
        case = fd_inputs(rng, dtype)
        desc = describe(case) + f" torch={use_torch}"
        if not use_torch:
            x, kx = relayout(rng, case["xs"])
            y, ky = relayout(rng, case["ys"])
            mask, km = (None, "none") if case["mask"] is None else relayout(rng, case["mask"])
            expect = "valid"  # the public API copies any layout into an accepted one

            def call(x=x, y=y, mask=mask, case=case):
                out = lpl_ext.feature_distance(x, y, mask, norm=case["norm"], distance=case["dist"],
                                               weight=case["weight"])
                if not isinstance(out, np.ndarray) or out.dtype != x.dtype.newbyteorder("="):
                    raise CaseFailure(f"returned {type(out).__name__} {getattr(out, 'dtype', None)}, not {x.dtype}")
                return out.astype(np.float64), None

            # the loss comes back in x's dtype: compare at that precision
            def check(out, case=case):
                check_fd(case, out[0], None, loss_in_dtype=True)

            fz.run(desc + f" x={kx} y={ky} mask={km}", expect, call, check)
            continue
        xt, yt = as_torch(case["xs"], dtype), as_torch(case["ys"], dtype)
        mt = None if case["mask"] is None else torch.from_numpy(case["mask"])
        lay = str(rng.choice(["contig", "transposed", "sliced"]))
        if lay == "transposed":
            xt, yt = xt.transpose(2, 3).contiguous().transpose(2, 3), yt.transpose(2, 3).contiguous().transpose(2, 3)
        elif lay == "sliced":
            xt = torch.cat([xt, xt], dim=3)[..., : xt.shape[3]] if xt.numel() else xt
        xt = xt.clone().requires_grad_(rng.random() < 0.7)

        def call(xt=xt, yt=yt, mt=mt, case=case):
            out = lpl_ext.feature_distance(xt, yt, mt, norm=case["norm"], distance=case["dist"],
                                           weight=case["weight"])
            if out.dtype != xt.dtype or out.shape != (xt.shape[0],):
                raise CaseFailure(f"loss dtype/shape {out.dtype} {tuple(out.shape)}")
            g = None
            if xt.requires_grad:
                # powers of two: the backward's rescaling is exact, so dividing it out is too
                # (float16: 1, a smaller scale would flush tiny gradients to 0)
                go = torch.pow(2.0, (torch.arange(xt.shape[0]) % 7 - 3).double()).to(out.dtype)
                if out.dtype == torch.float16:
                    go = torch.ones_like(go)
                (g,) = torch.autograd.grad(out, xt, go, allow_unused=True)
                g = torch.zeros_like(xt) if g is None else g
                g = g.double().numpy() / go.double().numpy().reshape(-1, 1, 1, 1) if xt.shape[0] else g.double().numpy()
            return out.double().detach().numpy(), g

        def check(out, case=case):
            check_fd(case, out[0], out[1], loss_in_dtype=True)

        fz.run(desc + f" layout={lay} requires_grad={xt.requires_grad}", "valid", call, check)


# ---- group: workspace -------------------------------------------------------------------

def group_workspace_fd(fz: Fuzz, ncases: int) -> None:
    group_workspace(fz, ncases, "fd")


def group_workspace_om(fz: Fuzz, ncases: int) -> None:
    group_workspace(fz, ncases, "om")


def group_workspace(fz: Fuzz, ncases: int, fn: str) -> None:
    """feature_distance_workspace(n, c) and outlier_mask_workspace_bytes(n, c, h, w):
    exact non-negative ints or an exception, never a wrapped-around value."""
    from lpl_ext import _C

    rng = fz.rng
    edge = [0, 1, 2, 3, 7, 2**16, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**61, 2**62, 2**63 - 1, 2**63, 2**64, -1,
            -(2**63), 1.5, "3", None, True]
    while fz.cases < ncases:
        nargs = 2 if fn == "fd" else 4
        r = rng.random()
        if r < 0.1:
            k = int(rng.integers(0, 6))
            args = [1] * k
            expect = "valid" if k == nargs else "invalid"
        else:
            args = [int(rng.integers(0, 64)) if rng.random() < 0.5 else edge[int(rng.integers(0, len(edge)))]
                    for _ in range(nargs)]
            expect = "either"
        f = _C.feature_distance_workspace if fn == "fd" else _C.outlier_mask_workspace_bytes

        def check(out, f=f, args=args):
            # no formula is pinned here (it follows the CUDA kernels' design); what must
            # hold: an exact Python int, never negative, at least one scratch slot per
            # (n, c) plane, and monotone in every size (a wrapped-around int64 product
            # breaks one of these)
            if not isinstance(out, int) or out < 0:
                raise CaseFailure(f"returned {out!r}")
            if not all(isinstance(a, int) for a in args):
                raise CaseFailure(f"accepted non-integer arguments {args!r}")
            if any(a < 0 for a in args):
                raise CaseFailure(f"accepted negative sizes {args!r}")
            if out < args[0] * args[1]:
                raise CaseFailure(f"{out} is less than one slot per plane ({args[0] * args[1]})")
            for i in range(len(args)):
                bigger = list(args)
                bigger[i] = 2 * bigger[i] + 1
                try:
                    more = f(*bigger)
                except ALLOWED_ERRORS:
                    continue
                if more < out:
                    raise CaseFailure(f"f{tuple(bigger)} = {more} < f{tuple(args)} = {out}")

        fz.run(f"{fn}{tuple(args)}", expect, lambda f=f, args=args: f(*args), check)


# ---- outlier mask groups ------------------------------------------------------------------

def ref_om(y_t, quantile: float, margin_std: float, closing: int, opening: int) -> np.ndarray:
    from reference import ref_outlier_mask

    return ref_outlier_mask(y_t, quantile=quantile, margin_std=margin_std, closing=closing, opening=opening).numpy()


def om_inputs(rng: np.random.Generator, dtype: str) -> dict:
    r = rng.random()
    if r < 0.06:
        # one large plane: the whole OpenMP team on one plane (split by rows), histogram path
        shape = (1, 1, int(rng.integers(128, 200)), int(rng.integers(128, 200)))
    elif r < 0.12:
        # several planes past the direct-select size (histogram + radix select)
        shape = (int(rng.integers(1, 3)), int(rng.integers(2, 4)), int(rng.integers(65, 100)), int(rng.integers(65, 100)))
    else:
        shape = rand_shape(rng, 0.08, big_prob=0.0)
        shape = (shape[0], shape[1], int(rng.integers(0, 14)) if rng.random() < 0.5 else shape[2] + 2,
                 int(rng.integers(0, 14)) if rng.random() < 0.5 else shape[3] + 2)
    v = rand_values(rng, shape)
    if v.size and rng.random() < 0.4:
        # plant outliers
        idx = rng.integers(0, v.size, max(1, v.size // 30))
        v.ravel()[idx] *= float(rng.choice([10.0, 100.0]))
    if v.size and rng.random() < 0.15:
        v.ravel()[rng.integers(0, v.size, max(1, v.size // 20))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    ys, y64 = storage(rng, v, dtype)
    return dict(shape=shape, dtype=dtype, ys=ys, y64=y64,
                quantile=float(rng.choice([0.02, 0.02, 0.1, 0.25, 0.001, 0.49])),
                margin_std=float(rng.choice([2.0, 2.0, 0.0, 0.5, 3.0])),
                closing=int(rng.choice([1, 3, 3, 5])), opening=int(rng.choice([1, 3, 5, 5, 7])))


def om_ref_torch(case: dict):
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(case["ys"]))
    if case["dtype"] == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def check_om(case: dict, keep: np.ndarray, stats: Optional[np.ndarray]) -> None:
    if case["y64"].size == 0:
        want = np.zeros(case["y64"].shape, bool)  # max_pool2d rejects empty planes
    else:
        want = ref_om(om_ref_torch(case), case["quantile"], case["margin_std"], case["closing"], case["opening"])
    keep = np.asarray(keep) != 0
    if keep.shape != want.shape:
        raise CaseFailure(f"keep shape {keep.shape} != {want.shape}")
    if not np.array_equal(keep, want):
        bad = np.argwhere(keep != want)
        raise CaseFailure(f"keep differs at {len(bad)} positions, first {tuple(bad[0])}")
    if stats is not None:
        y = np.where(want, case["y64"], 0.0)
        n = y.size
        mean = y.mean() if n else np.nan
        std = y.std(ddof=1) if n > 1 else np.nan
        ratio = 1.0 - want.mean() if n else np.nan
        want_stats = np.array([mean, std, ratio])
        got = np.asarray(stats, dtype=np.float64)
        # a NaN statistic of an empty tensor may also be reported as 0
        if n == 0:
            return
        assert_close("stats", got, want_stats, 1e-5, 1e-5 * (np.abs(want_stats[:2]).max() + 1.0))


def group_om_valid(fz: Fuzz, ncases: int) -> None:
    from lpl_ext import _C

    torch = _torch()
    rng = fz.rng
    while fz.cases < ncases:
        dtype = str(rng.choice(["float32", "float64", "float16", "bfloat16"]))
        case = om_inputs(rng, dtype)
        shape = case["shape"]
        kdt = bool if rng.random() < 0.5 else np.uint8
        with_stats = rng.random() < 0.7
        use_torch = dtype == "bfloat16" or rng.random() < 0.3
        desc = (f"shape={shape} {dtype} q={case['quantile']} m={case['margin_std']} "
                f"closing={case['closing']} opening={case['opening']} keep={np.dtype(kdt)} stats={with_stats} torch={use_torch}")
        keep = np.full(shape, 7 if kdt == np.uint8 else True, dtype=kdt)
        stats = np.full(3, -7.0) if with_stats else None
        if use_torch:
            yt = om_ref_torch(case)
            kt, st = torch.from_numpy(keep), None if stats is None else torch.from_numpy(stats)
            args = (yt, kt, st)
        else:
            args = (case["ys"], keep, stats)

        def call(args=args, keep=keep, stats=stats, case=case):
            _C.outlier_mask(args[0], args[1], args[2], case["quantile"], case["margin_std"], case["closing"],
                            case["opening"])
            return keep.copy(), None if stats is None else stats.copy()

        fz.run(desc, "valid", call, lambda out, case=case: check_om(case, out[0], out[1]))


# option values of group_om_bad: (value, accepted); odd windows past the plane are valid
OM_BAD_OPTIONS = [
    [(0.0, False), (-0.1, False), (0.5, False), (0.7, False), (1.0, False), (float("nan"), False),
     (float("inf"), False), ("0.02", False), (None, False), (2**70, False), (0.3, True), (1e-9, True)],
    [(-1.0, False), (float("nan"), False), (float("inf"), False), (-float("inf"), False), ("2", False),
     (None, False), (0.0, True), (1e3, True)],
    [(0, False), (-1, False), (2, False), (4, False), (2**31, False), (2**63, False), (1.0, False), (None, False),
     ("3", False), (10**6, False), (31, True)],
    [(0, False), (-3, False), (2, False), (6, False), (2**31 + 1, False), (2**64, False), (3.5, False),
     (None, False), (10**6 + 1, True)],
]


def group_om_bad(fz: Fuzz, ncases: int) -> None:
    """outlier_mask with broken arguments, layouts, huge stride-0 shapes and odd options,
    next to harmless variations of each (accepted layouts, odd large windows, boundary
    options): every case is predicted valid or invalid."""
    from lpl_ext import _C

    rng = fz.rng
    while fz.cases < ncases:
        dtype = str(rng.choice(["float32", "float64", "float16"]))
        case = om_inputs(rng, dtype)
        shape = case["shape"]
        r = rng.random()
        # the branches that break something else keep y in an accepted layout
        y, ky = relayout(rng, case["ys"], None if r >= 0.75 else PLAIN_LAYOUTS)
        keep = np.zeros(shape, bool)
        stats: Any = np.zeros(3)
        opts = [case["quantile"], case["margin_std"], case["closing"], case["opening"]]
        opts_ok = True
        what = f"y={ky}"
        if r < 0.15:
            big = [1, 1, 2**31 + 1, int(rng.choice([1, 3, 2**30]))] if rng.random() < 0.5 else [2**20, 2**12, 2**10, 1]
            while math.prod(big) > np.iinfo(np.intp).max // np.dtype(dtype).itemsize:
                big[3] //= 2
            y = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), tuple(big), (0,) * 4)
            keep = np.lib.stride_tricks.as_strided(np.zeros(1, bool), tuple(big), (0,) * 4)
            what = f"huge stride-0 {big}"
        elif r < 0.3:
            kk = str(rng.choice(["readonly", "float32", "shape", "step", "int8", "uint8", "size1_strides"]))
            if kk == "readonly":
                keep.flags.writeable = False
            elif kk == "float32":
                keep = keep.astype(np.float32)
            elif kk == "shape":
                keep = np.zeros(shape[:3] + (shape[3] + 1,), bool)
            elif kk == "step":
                keep = np.zeros(shape[:3] + (2 * shape[3],), bool)[..., ::2]
            elif kk == "int8":
                keep = keep.astype(np.int8)
            elif kk == "uint8":
                keep = keep.astype(np.uint8)
            else:
                keep = relayout(rng, keep, ["size1_strides"])[0]
            what += f" keep={kk}"
        elif r < 0.45:
            sk = str(rng.choice(["short", "float32", "readonly", "2d", "list", "none", "step1"]))
            stats = {"short": np.zeros(2), "float32": np.zeros(3, np.float32), "2d": np.zeros((3, 1)),
                     "list": [0.0, 0.0, 0.0], "readonly": np.zeros(3), "none": None,
                     "step1": np.zeros(6)[::2]}[sk]
            if sk == "readonly":
                stats.flags.writeable = False
            what += f" stats={sk}"
        elif r < 0.65:
            i = int(rng.integers(0, 4))
            opts[i], opts_ok = OM_BAD_OPTIONS[i][int(rng.integers(0, len(OM_BAD_OPTIONS[i])))]
            what += f" option{i}={opts[i]!r}"
        elif r < 0.75:
            k = int(rng.integers(0, 11))
            what = f"{k} positional arguments"
            # 7 required, then stream and workspace (a later extra argument: either)
            expect = "valid" if 7 <= k <= 9 else ("either" if k == 10 else "invalid")

            def call(k=k, y=y, keep=keep, stats=stats, opts=opts):
                _C.outlier_mask(*([y, keep, stats] + opts + [0, None, 1])[:k])
                return np.array(keep), np.array(stats)

            fz.run(what, expect, call, lambda out, case=case: check_om(case, out[0], out[1]))
            continue
        ok = (opts_ok and accepted(y, ("float32", "float64", "float16")) and accepted(keep, ("bool", "uint8"), True)
              and keep.shape == shape and (stats is None or (accepted(stats, ("float64",), True) and stats.shape == (3,))))

        def call(y=y, keep=keep, stats=stats, opts=opts):
            _C.outlier_mask(y, keep, stats, *opts)
            return np.array(keep), None if stats is None else np.array(stats)

        def check(out, opts=opts, case=case):
            c = dict(case)
            c.update(quantile=float(opts[0]), margin_std=float(opts[1]), closing=int(opts[2]), opening=int(opts[3]))
            check_om(c, out[0], out[1])

        fz.run(what, "valid" if ok else "invalid", call, check)


def group_om_public(fz: Fuzz, ncases: int) -> None:
    import lpl_ext

    torch = _torch()
    rng = fz.rng
    if not hasattr(lpl_ext, "outlier_mask"):
        raise CaseFailure("lpl_ext.outlier_mask does not exist yet")
    while fz.cases < ncases:
        use_torch = rng.random() < 0.5
        dtype = str(rng.choice(["float32", "float64", "float16"] + (["bfloat16"] if use_torch else [])))
        case = om_inputs(rng, dtype)
        if use_torch:
            y = om_ref_torch(case)
            if rng.random() < 0.3:
                y = y.transpose(2, 3).contiguous().transpose(2, 3)
            ky = "torch"
        else:
            y, ky = relayout(rng, case["ys"])
        expect = "valid"  # the public API copies any layout into an accepted one

        def call(y=y, case=case):
            keep, stats = lpl_ext.outlier_mask(y, quantile=case["quantile"], margin_std=case["margin_std"],
                                               closing=case["closing"], opening=case["opening"], return_stats=True)
            if use_torch:
                keep, stats = keep.numpy(), torch.stack([torch.as_tensor(s) for s in stats]).double().numpy() \
                    if isinstance(stats, (tuple, list)) else stats.double().numpy()
            else:
                stats = np.asarray(stats, dtype=np.float64)
            return np.asarray(keep), np.asarray(stats).reshape(-1)

        fz.run(f"shape={case['shape']} {dtype} {ky}", expect, call,
               lambda out, case=case: check_om(case, out[0], out[1]))


def child_main(argv: list) -> int:
    """argv: comma-separated groups [seed]. Runs the groups in order; a group that finds a
    wrong result prints FUZZ-FAIL and the next group still runs (a crash ends all)."""
    groups = argv[0].split(",")
    seed = int(argv[1]) if len(argv) > 1 else SEED
    sys.path.insert(0, str(HERE))
    rc = 0
    for group in groups:
        fz = Fuzz(seed + sum(map(ord, group)))
        print(f"FUZZ-START group={group}", flush=True)
        try:
            globals()["group_" + group](fz, GROUPS[group][0])
        except CaseFailure as exc:
            traceback.print_exc()
            print(f"FUZZ-FAIL group={group} case={fz.cases}: {exc}", flush=True)
            rc = 3
            continue
        print(f"FUZZ-DONE group={group} cases={fz.cases} valid={fz.valid} raised={fz.raised}", flush=True)
    return rc


# ======================================================================================
# pytest side
# ======================================================================================

def run_child(args: list, timeout: float = 400.0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(HERE))


def outcome(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.splitlines()
    fails = [ln for ln in lines if ln.startswith("FUZZ-FAIL")]
    tail = "\n".join(lines[-6:])
    return (f"exit code {proc.returncode}\n" + "\n".join(fails) + f"\n--- stdout tail ---\n{tail}\n"
            f"--- stderr tail ---\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("child", list(CHILDREN))
def test_fuzz(child: str) -> None:
    """Runs the fuzz groups of one entry point in a child process: exit 0, no sanitizer
    output, every group done with at least its minimum number of (valid) cases."""
    proc = run_child([",".join(CHILDREN[child]), str(SEED)])
    report = outcome(proc)
    assert "ERROR: AddressSanitizer" not in proc.stderr, report
    assert "runtime error:" not in proc.stderr, report
    done = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"FUZZ-DONE group=(\w+) cases=(\d+) valid=(\d+) raised=(\d+)", proc.stdout)}
    for line in re.findall(r"FUZZ-DONE .*", proc.stdout):
        print(line)
    assert proc.returncode == 0, report
    for group in CHILDREN[child]:
        _, min_cases, min_valid = GROUPS[group]
        assert group in done, report
        cases, valid = done[group]
        assert cases >= min_cases and valid >= min_valid, f"{group}: {done[group]}"


def test_sanitized_build_in_use() -> None:
    """Under tests/sanitize_run.sh the imported extension must be the sanitized build."""
    if os.environ.get("LPL_EXT_EXPECT_SANITIZE") != "1":
        pytest.skip("checks the sanitized build, which only tests/sanitize_run.sh imports; run it with "
                    "`bash tests/sanitize_run.sh \"$PWD/tests/test_fuzz.py\" -k sanitized_build_in_use` "
                    "from the repository root (CI runs it within `bash tests/sanitize_run.sh`)")
    from lpl_ext import _C

    assert _C.build_info()["sanitize"] is True, _C.__file__


EMPTY_HUGE_CHILD = r"""
import resource, sys, numpy as np
from lpl_ext import _C
# cap the address space a few GiB above what the imports use: allocating O(N*C) scratch
# for a tensor with no elements then fails instead of exhausting the machine
with open('/proc/self/status') as f:
    vm = [int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize')][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
for shape in [(1, 2**31, 0, 1), (1, 2**40, 0, 0), (2, 3, 0, 2**40)]:
    for norm in ("shared", "batch", "default", "none"):
        x = np.empty(shape, np.float32)
        loss = np.full(shape[0], -1.0)
        _C.feature_distance(x, x, None, loss, None, norm, "mse", 1.0)
        assert np.all(loss == 0.0), (shape, norm, loss)
    keep = np.empty(shape, bool)
    stats = np.zeros(3)
    _C.outlier_mask(x, keep, stats, 0.02, 2.0, 3, 5)
print("EMPTY-OK")
"""


def test_empty_tensor_with_huge_dims_returns_zero() -> None:
    """A tensor with no elements is a valid input (loss 0, empty mask) whatever its other
    dims: the kernels must not allocate O(N*C) scratch for it (a (1, 2**31, 0, 1) float32 input
    costs 0 bytes but would otherwise ask for ~48 GiB and get the process OOM-killed)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-c", EMPTY_HUGE_CHILD], capture_output=True, text=True, timeout=120,
                          env=env, cwd=str(HERE))
    assert proc.returncode == 0 and "EMPTY-OK" in proc.stdout, outcome(proc)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
