"""CUDA behaviour that only a real GPU can show (skipped without one; the prepared GPU
check, benchmarks/gpu_check.py, runs this file): inputs produced on a side stream, the
first call of a process inside a ``torch.cuda.graph`` capture, a layer past 2^32
elements on the device, and both kernel sets (LPL_EXT_KERNEL_SET) against the CPU.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lpl_ext
from lpl_ext import _C
from tolerance import assert_close_to_scale

CUDA = torch.cuda.is_available() and bool(lpl_ext.build_info().get("cuda"))
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of lpl_ext")


def test_cuda_inputs_from_a_side_stream_that_was_waited_for():
    """Features computed on a side stream, then the current stream waits for it: the loss,
    gradient and mask equal the CPU kernels' (masks bit for bit)."""
    side = torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.cuda.stream(side):
        y = torch.randn(2, 64, 48, 40, device="cuda", generator=g)
        y[:, :, 10:14, 10:14] += 30.0
        x = (y + 0.2 * torch.randn(y.shape, device="cuda", generator=g)).requires_grad_(True)
    torch.cuda.current_stream().wait_stream(side)
    keep = lpl_ext.outlier_mask(y)
    loss = lpl_ext.feature_distance(x, y, keep, norm="shared")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    xc = x.detach().cpu().requires_grad_(True)
    keep_c = lpl_ext.outlier_mask(y.cpu())
    loss_c = lpl_ext.feature_distance(xc, y.cpu(), keep_c, norm="shared")
    (grad_c,) = torch.autograd.grad(loss_c.sum(), xc)
    assert torch.equal(keep.cpu(), keep_c)
    assert_close_to_scale(loss.cpu(), loss_c, rtol=1e-5, what="loss")
    assert_close_to_scale(grad.cpu(), grad_c, rtol=1e-5, what="gradient")


CAPTURE_SCRIPT = textwrap.dedent("""
    import torch, lpl_ext
    g = torch.Generator(device="cuda").manual_seed(1)
    y = torch.randn(2, 32, 40, 40, device="cuda", generator=g)
    y[:, :, 5:9, 5:9] += 25.0
    x = (y + 0.1 * torch.randn(y.shape, device="cuda", generator=g)).requires_grad_(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # the first lpl_ext call of this process happens inside the capture: every kernel image
    # must already be loaded, no allocation or synchronous driver call may happen
    with torch.cuda.graph(graph):
        keep = lpl_ext.outlier_mask(y)
        loss = lpl_ext.feature_distance(x, y, keep, norm="default")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    y.mul_(1.5)  # new inputs in the same buffers
    graph.replay()
    torch.cuda.synchronize()
    keep_e = lpl_ext.outlier_mask(y)
    loss_e = lpl_ext.feature_distance(x, y, keep_e, norm="default")
    (grad_e,) = torch.autograd.grad(loss_e.sum(), x)
    assert torch.equal(keep, keep_e), "mask"
    torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, grad_e, rtol=1e-6, atol=1e-6 * float(grad_e.abs().max()))
    print("capture ok")
""")


def test_first_call_of_the_process_inside_a_cuda_graph_capture():
    run = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "capture ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_feature_distance_past_2_32_elements_on_the_gpu():
    """The (3, 4, 16384, 21846) float16 layer of tests/test_large_index.py on the device:
    equal to the CPU kernel on the same values (which that test checks against the oracle)."""
    from test_large_index import FD_SHAPE, _fd_inputs

    free, _ = torch.cuda.mem_get_info()
    n_elem = int(np.prod(FD_SHAPE))
    assert free > n_elem * (2 + 2 + 1 + 2) * 1.1, "the GPU lacks memory for the 2^32-element layer"
    x, y, mask, region = _fd_inputs()
    want = np.full(FD_SHAPE[0], -1.0)
    _C.feature_distance(x, y, mask, want, None, "shared", "mse", 1.0, 0, None)
    xd = torch.zeros(FD_SHAPE, dtype=torch.float16, device="cuda")
    yd = torch.zeros_like(xd)
    md = torch.zeros(FD_SHAPE, dtype=torch.bool, device="cuda")
    xd[region] = torch.from_numpy(x[region]).cuda()
    yd[region] = torch.from_numpy(y[region]).cuda()
    md[region] = torch.from_numpy(mask[region] != 0).cuda()
    got = lpl_ext.feature_distance(xd, yd, md, norm="shared")
    np.testing.assert_allclose(got.double().cpu().numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_kernel_sets_agree_with_the_cpu(monkeypatch, dtype):
    """LPL_EXT_KERNEL_SET=v2 (current) and v1 (the 0.2 kernels) on the same inputs: masks
    bit-identical to the CPU's, losses and gradients within float tolerance, for every norm;
    the weighted path (weights folded into the fused gradient on v2) too."""
    g = torch.Generator(device="cuda").manual_seed(3)
    y = torch.randn(3, 48, 37, 29, device="cuda", generator=g).to(dtype)
    y[:, :, 4:8, 4:8] += 20.0
    x = (y.float() + 0.3 * torch.randn(y.shape, device="cuda", generator=g)).to(dtype)
    w = torch.tensor([0.5, 2.0, 1.0], device="cuda")
    keep_c = lpl_ext.outlier_mask(y.cpu())
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for kernel_set in ("v2", "v1"):
        monkeypatch.setenv("LPL_EXT_KERNEL_SET", kernel_set)
        keep = lpl_ext.outlier_mask(y)
        assert torch.equal(keep.cpu(), keep_c), kernel_set
        for norm in _C.NORMS:
            xd = x.clone().requires_grad_(True)
            xc = x.cpu().requires_grad_(True)
            total, _ = lpl_ext.weighted_feature_distance(xd, y, keep, sample_weight=w, norm=norm)
            total_c, _ = lpl_ext.weighted_feature_distance(xc, y.cpu(), keep_c, sample_weight=w.cpu(), norm=norm)
            (2.0 * total).backward()
            (2.0 * total_c).backward()
            what = f"{kernel_set} {norm}"
            assert_close_to_scale(total.cpu(), total_c, rtol=rtol, what=f"total {what}")
            assert_close_to_scale(xd.grad.cpu().float(), xc.grad.float(), rtol=rtol * 4, what=f"gradient {what}")
