"""lpl_ext.LatentPerceptualLoss on tiny diffusers AutoencoderKLs (4 up blocks, so all five
feature levels and all outlier layers exist).

Oracles: tests/reference_lpl.py (a plain-PyTorch restatement of the public reference
class, itself checked against the reference's recorded outputs in tests/data) for
``reference_compat=True``, and a spec-section-1..4 composition of plain-PyTorch pieces
(tests/reference.py) for the fixed default mode.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lpl_ext
from lpl_ext import LatentPerceptualLoss
from reference import outlier_windows, ref_feature_distance, ref_outlier_mask
from reference_lpl import (
    ReferenceLPL,
    blob_vae,
    plain_decoder_features,
    reference_layer_loss,
    reference_remove_outliers,
    tiny_vae,
)
from tolerance import assert_close_to_scale
from test_module_parity import DistanceSpy

DATA = Path(__file__).parent / "data"
DOWN = {2: 2, 3: 1, 4: 1}


@pytest.fixture(scope="module")
def vaes():
    return {name: tiny_vae(name) for name in ("sdxl_like", "shifted", "wide")}


def latents(vae, n=2, hw=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64).to(dtype)
    y = (x.double() + 0.5 * torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)).to(dtype)
    return x.requires_grad_(True), y


def scale_shift(vae):
    return vae.config.scaling_factor, (vae.config.shift_factor or 0.0)


def fixed_oracle(vae, x, y, *, num_blocks, norm, loss_type, pow_law, remove_outliers):
    """docs/spec.md ("Loss module" with its mask, normalization and distance) composed from
    plain-PyTorch pieces: per-layer (N,) losses."""
    s, b = scale_shift(vae)
    fx = plain_decoder_features(vae, x / s + b, num_blocks)
    with torch.no_grad():
        fy = plain_decoder_features(vae, y / s + b, num_blocks)
    out = []
    for i, (a, t) in enumerate(zip(fx, fy)):
        keep = None
        if remove_outliers and i in DOWN:
            closing, opening = outlier_windows(DOWN[i])
            keep = ref_outlier_mask(t, closing=closing, opening=opening)
        w = 2.0 ** -min(i, 3) if pow_law else 1.0
        out.append(ref_feature_distance(a, t, keep, norm=norm, distance=loss_type, weight=w))
    return out


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def assert_close_grad(a, b, rtol=1e-4):
    """Gradients through two decoder paths: every element judged at the gradient's own
    magnitude (tests/tolerance.py). A float32 decoder backward sums ~10^3 terms per
    element and layer, so an element near zero can be off by ~1e-6 of the largest one
    (measured: 1.4e-6 with one OpenMP thread and the oracle in channels_last)."""
    assert_close_to_scale(a, b, rtol=rtol, what="gradient")


# ---------------------------------------------------------------- the restatement itself

def _index(kind):
    return [e for e in json.loads((DATA / "index.json").read_text()) if e["kind"] == kind]


@pytest.mark.parametrize("entry", _index("layer_loss"), ids=lambda e: e["file"])
def test_restatement_matches_recorded_reference_layer(entry):
    """tests/reference_lpl.py reproduces the public reference's own per-layer outputs."""
    d = np.load(DATA / entry["file"])
    x = torch.from_numpy(d["x"]).requires_grad_(True)
    y = torch.from_numpy(d["y"])
    loss, stats, mask = reference_layer_loss(
        x, y, entry["layer_index"], norm_type=entry["norm_type"], loss_type=entry["loss_type"],
        pow_law=entry["pow_law"], remove_outliers=entry["remove_outliers"])
    assert torch.equal(mask, torch.from_numpy(d["keep"]))
    torch.testing.assert_close(loss, torch.from_numpy(d["loss"]), rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad((loss * torch.from_numpy(d["grad_output"])).sum(), x)
    torch.testing.assert_close(g, torch.from_numpy(d["grad_x"]), rtol=1e-10, atol=1e-14)
    assert isinstance(stats["mean"], float)


@pytest.mark.parametrize("entry", [e for e in _index("outlier_mask") if e["shape"][-1] * e["shape"][-2] >= 50],
                         ids=lambda e: e["file"])
def test_restatement_matches_recorded_reference_mask(entry):
    d = np.load(DATA / entry["file"])
    mask, _ = reference_remove_outliers(torch.from_numpy(d["y"]), entry["down_factor"])
    assert torch.equal(mask, torch.from_numpy(d["keep"]))


# ---------------------------------------------------------------- compat parity

COMPAT_CASES = [
    ("sdxl_like", dict(norm_type="default")),
    ("sdxl_like", dict(norm_type="shared", pow_law=True)),
    ("sdxl_like", dict(norm_type="batch", loss_type="l1", pow_law=True)),
    ("sdxl_like", dict(norm_type="shared", remove_outliers=False, grad_ckpt=False)),
    ("sdxl_like", dict(norm_type="default", loss_type="l1", num_mid_blocks=2)),
    ("sdxl_like", dict(norm_type="shared", num_mid_blocks=0)),
    ("shifted", dict(norm_type="shared", pow_law=True)),
    ("shifted", dict(norm_type="default", loss_type="l1", grad_ckpt=False)),
    ("shifted", dict(norm_type="batch", num_mid_blocks=3)),
    ("wide", dict(norm_type="shared", pow_law=True)),
    ("wide", dict(norm_type="default", remove_outliers=False, num_mid_blocks=1)),
]


@pytest.mark.parametrize("name,opts", COMPAT_CASES)
def test_compat_matches_reference(vaes, name, opts):
    vae = vaes[name]
    x, y = latents(vae, seed=len(str(opts)))
    ref = ReferenceLPL(vae, **opts)
    ours = LatentPerceptualLoss(vae, reference_compat=True, **opts)
    want_hist = ref.get_loss(x, y, get_hist=True)
    got_hist = ours.get_loss(x, y, get_hist=True)
    assert len(got_hist) == len(want_hist) == 1 + opts.get("num_mid_blocks", 4)
    for got, want in zip(got_hist, want_hist):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    want, got = ref.get_loss(x, y), ours.get_loss(x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert_close_grad(grad_of(got, x), grad_of(want, x))
    for s_got, s_tensors, s_want in zip(ours.last_feature_stats, ours.last_feature_stats_tensors,
                                        ref.last_feature_stats):
        for key in ("mean", "std", "outlier_ratio"):
            # floats like the reference's, and the same values as device tensors
            assert isinstance(s_got[key], float) and s_tensors[key].dim() == 0
            assert s_got[key] == float(s_tensors[key])
            assert s_got[key] == pytest.approx(s_want[key], rel=1e-4, abs=1e-6)


def test_compat_image_feature_type_matches_reference(vaes):
    vae = vaes["sdxl_like"]
    x, y = latents(vae, hw=4)
    ref = ReferenceLPL(vae, feature_type="image")
    ours = LatentPerceptualLoss(vae, feature_type="image", reference_compat=True)
    want, got = ref.get_loss(x, y), ours.get_loss(x, y)
    assert got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert_close_grad(grad_of(got, x), grad_of(want, x))


# ---------------------------------------------------------------- fixed mode

FIXED_CASES = [
    ("sdxl_like", dict(norm_type="shared", pow_law=True)),
    ("sdxl_like", dict(norm_type="batch", loss_type="l1")),
    ("sdxl_like", dict(norm_type="default", remove_outliers=False, num_mid_blocks=2)),
    ("shifted", dict(norm_type="none", pow_law=True)),
    ("shifted", dict(norm_type="batch", pow_law=True, grad_ckpt=False)),
    ("wide", dict(norm_type="default", loss_type="l1", num_mid_blocks=3)),
]


@pytest.mark.parametrize("name,opts", FIXED_CASES)
def test_fixed_mode_matches_spec_oracle(vaes, name, opts):
    vae = vaes[name]
    x, y = latents(vae, n=3, seed=7)
    ours = LatentPerceptualLoss(vae, **opts)
    want = fixed_oracle(vae, x, y, num_blocks=opts.get("num_mid_blocks", 4), norm=opts["norm_type"],
                        loss_type=opts.get("loss_type", "mse"), pow_law=opts.get("pow_law", False),
                        remove_outliers=opts.get("remove_outliers", True))
    got = ours.get_loss(x, y, get_hist=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    total = ours.get_loss(x, y)
    assert total.shape == (3,)
    assert_close_grad(grad_of(total, x), grad_of(sum(want) / len(want), x))


def test_fixed_image_feature_type_is_per_sample_decode_mse(vaes):
    vae = vaes["shifted"]
    x, y = latents(vae, n=2, hw=4)
    s, b = scale_shift(vae)
    ours = LatentPerceptualLoss(vae, feature_type="image")
    got = ours.get_loss(x, y)
    want = ((vae.decode(x / s + b).sample - vae.decode(y / s + b).sample) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert_close_grad(grad_of(got, x), grad_of(want, x))


def test_features_follow_the_real_decode_path_under_autocast(vaes):
    """post_quant_conv applied, no stale up-block dtype cast: the features are the block
    outputs of vae.decode itself (captured with hooks), also under bf16 autocast."""
    vae = vaes["sdxl_like"]
    x, _ = latents(vae)
    s, b = scale_shift(vae)
    captured = []
    blocks = [vae.decoder.mid_block] + list(vae.decoder.up_blocks)
    hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o)) for m in blocks]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            vae.decode(x / s + b)
            mine = LatentPerceptualLoss(vae).get_features(x / s + b, disable_grads=True)
            compat = LatentPerceptualLoss(vae, reference_compat=True).get_features(x / s + b, disable_grads=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(mine) == 5
    for got, want in zip(mine, captured[:5]):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)
    # The reference's leftover cast turns the mid output into the up blocks' fp32.
    assert compat[0].dtype == torch.float32


# ---------------------------------------------------------------- reference defects fixed

def test_post_quant_conv_is_applied_unless_compat(vaes):
    vae = vaes["sdxl_like"]
    x, y = latents(vae)
    fixed = LatentPerceptualLoss(vae, norm_type="shared").get_loss(x, y)
    compat = LatentPerceptualLoss(vae, norm_type="shared", reference_compat=True).get_loss(x, y)
    assert not torch.allclose(fixed, compat, rtol=1e-3)
    # Without a post_quant_conv the two modes agree.
    vae2 = vaes["shifted"]
    x2, y2 = latents(vae2)
    a = LatentPerceptualLoss(vae2, norm_type="shared").get_loss(x2, y2)
    b = LatentPerceptualLoss(vae2, norm_type="shared", reference_compat=True).get_loss(x2, y2)
    assert_close_to_scale(a, b, rtol=1e-6)


def test_batch_norm_normalizes_unless_compat(vaes):
    vae = vaes["shifted"]  # no post_quant_conv: the modes differ only by the norm
    x, y = latents(vae)
    fixed_batch = LatentPerceptualLoss(vae, norm_type="batch").get_loss(x, y)
    fixed_none = LatentPerceptualLoss(vae, norm_type="none").get_loss(x, y)
    compat_batch = LatentPerceptualLoss(vae, norm_type="batch", reference_compat=True).get_loss(x, y)
    assert_close_to_scale(compat_batch, fixed_none, rtol=1e-6)
    assert not torch.allclose(fixed_batch, fixed_none, rtol=1e-2)


def _constant_channel_vae():
    """Layer 2 (output of up block 1, its upsampler conv) gets a constant channel 3: the
    outlier mask removes every pixel of it, so the reference divides 0 by 0."""
    vae = tiny_vae("sdxl_like", seed=3)
    conv = vae.decoder.up_blocks[1].upsamplers[0].conv
    with torch.no_grad():
        conv.weight[3].zero_()
        conv.bias[3] = 0.5  # exact: the plane std is exactly 0
    return vae


@pytest.mark.parametrize("compat", [False, True])
def test_fully_masked_plane_contributes_zero_not_nan(compat):
    vae = _constant_channel_vae()
    x, y = latents(vae)
    ref = ReferenceLPL(vae, norm_type="shared", pow_law=True).get_loss(x, y, get_hist=True)
    assert torch.isnan(ref[2]).all()
    ours = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True, reference_compat=compat)
    got = ours.get_loss(x, y, get_hist=True)
    if compat:
        # the reference's arithmetic with the empty plane's 0/0 replaced by 0
        want = ReferenceLPL(vae, norm_type="shared", pow_law=True, fixed_where_undefined=True).get_loss(
            x, y, get_hist=True)
    else:
        want = fixed_oracle(vae, x, y, num_blocks=4, norm="shared", loss_type="mse", pow_law=True,
                            remove_outliers=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=lambda m: f"layer {i}: {m}")
    assert_close_grad(grad_of(sum(got), x), grad_of(sum(want), x))
    assert float(ours.last_feature_stats[2]["outlier_ratio"]) >= 1.0 / 16  # one of 16 channels


@pytest.mark.parametrize("compat", [False, True])
def test_small_planes_do_not_crash(compat):
    """1x1 latents: layer 2 is 4x4 = 16 values, k1 = floor(16 * 0.02) = 0. The reference
    raises; lpl_ext clamps the rank into [1, L] and matches the oracles that do the same,
    in float64."""
    vae = blob_vae("sdxl_like")
    x, y = latents(vae, hw=1, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        ReferenceLPL(vae, norm_type="shared").get_loss(x, y)
    got = LatentPerceptualLoss(vae, norm_type="shared", reference_compat=compat).get_loss(x, y, get_hist=True)
    if compat:
        want = ReferenceLPL(vae, norm_type="shared", fixed_where_undefined=True).get_loss(x, y, get_hist=True)
    else:
        want = fixed_oracle(vae, x, y, num_blocks=4, norm="shared", loss_type="mse", pow_law=False,
                            remove_outliers=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to_scale(g, w.detach(), rtol=1e-10, what=f"layer {i}")
    assert_close_grad(grad_of(sum(got), x), grad_of(sum(want), x), rtol=1e-9)


def test_fp16_features_do_not_overflow_or_lose_eps(monkeypatch):
    """Large features in an fp16 VAE: the reference's fp16 channel sum of squares overflows
    (x / inf = 0); lpl_ext accumulates in fp32. Oracle: the spec's arithmetic in float64 on
    the very fp16 features the module compared (its mask from the float16 formulation of
    tests/reference.py), so what is left is fp32 accumulation and the fp16 result."""
    vae32 = tiny_vae("sdxl_like", seed=5)
    with torch.no_grad():  # blow the up-block-0 output (layer 1) up to ~1e3
        vae32.decoder.up_blocks[0].upsamplers[0].conv.weight.mul_(300.0)
    vae16 = tiny_vae("sdxl_like", seed=5, dtype=torch.float16)
    vae16.load_state_dict({k: v.half() for k, v in vae32.state_dict().items()})
    x, y = latents(vae32)
    x16 = x.detach().half().requires_grad_(True)
    y16 = y.half()
    with DistanceSpy().installed(monkeypatch) as spy:
        got = LatentPerceptualLoss(vae16, norm_type="default").get_loss(x16, y16, get_hist=True)
    ref = ReferenceLPL(vae16, norm_type="default").get_loss(x16, y16, get_hist=True)
    assert len(got) == len(spy.calls) == 5
    # layer 1's channel sum of squares is past fp16's 65504: the reference breaks there
    assert float(spy.calls[1]["y"].float().pow(2).sum(1).max()) > 65504
    for i, (g, call) in enumerate(zip(got, spy.calls)):
        assert g.dtype == torch.float32 and call["x"].dtype == torch.float16
        keep = None
        if i in DOWN:
            keep = ref_outlier_mask(call["y"], closing=outlier_windows(DOWN[i])[0],
                                    opening=outlier_windows(DOWN[i])[1])
            assert torch.equal(call["mask"], keep), f"layer {i} mask"
        want = ref_feature_distance(call["x"].double(), call["y"].double(), keep, norm="default")
        # accumulated in fp32, but returned rounded to fp16 (x's dtype; half an ulp is 2^-11)
        # before the module casts it to fp32
        assert_close_to_scale(g.double(), want, rtol=5e-4, what=f"layer {i}")
        if i == 1:
            assert not torch.isfinite(ref[1]).all() or not torch.allclose(ref[1].double(), want, rtol=0.1)
    assert torch.isfinite(grad_of(sum(got), x16)).all()


class SyncCounter(TorchDispatchMode):
    """Records ops whose result makes the host wait for the device on CUDA, attributed to
    the innermost lpl_ext source file on the Python stack. (The kernels' own wrappers may
    use CPU-only shortcuts such as a `.all()` check on CPU tensors, which are no sync there;
    their CUDA paths are their owners' tests.)"""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "masked_select",
                "unique", "allclose")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNC_OPS:
            where = "?"
            for frame in reversed(traceback.extract_stack()):
                if "/lpl_ext/" in frame.filename.replace("\\", "/"):
                    where = Path(frame.filename).name
                    break
            self.seen.append((name, where))
        return func(*args, **(kwargs or {}))

    def ours(self, files=("lpl_loss.py", "objective.py")):
        return [s for s in self.seen if s[1] in files]


def test_no_host_syncs_and_stats_are_tensors(vaes):
    vae = vaes["sdxl_like"]
    x, y = latents(vae)
    lpl = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True)
    with SyncCounter() as counter:
        loss = lpl.get_loss(x, y)
        (loss * torch.tensor([0.5, 2.0])).sum().backward()
    assert counter.ours() == []
    assert all(where != "?" for _, where in counter.seen)
    # the statistics stay on the device (0-dim tensors); the float view converts on read
    assert len(lpl.last_feature_stats_tensors) == 5
    for i, stats in enumerate(lpl.last_feature_stats_tensors):
        assert set(stats) == {"mean", "std", "outlier_ratio"}
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
        if i < 2:
            assert float(stats["outlier_ratio"]) == 0.0


def test_vae_is_frozen_and_outside_the_module_tree(vaes):
    """Frozen without being modified: the caller's requires_grad flags stay as they were,
    and no gradient reaches the VAE (docs/spec.md, "Loss module")."""
    vae = tiny_vae("sdxl_like", seed=11)
    assert all(p.requires_grad for p in vae.parameters())
    lpl = LatentPerceptualLoss(vae)
    assert list(lpl.parameters()) == []
    assert lpl.state_dict() == {}
    assert all(p.requires_grad for p in vae.parameters())
    assert {n for n, _ in lpl.named_buffers()} == {"scale", "shift"}
    x, y = latents(vae)
    lpl.get_loss(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_to_moves_scale_shift_buffers_and_the_vae():
    vae = tiny_vae("shifted", seed=2)
    lpl = LatentPerceptualLoss(vae, norm_type="shared").to(torch.float64)
    # float64 buffers hold the config values exactly, whatever dtype the module is cast to.
    assert lpl.scale.dtype == lpl.shift.dtype == torch.float64
    assert float(lpl.shift) == 0.0609 and float(lpl.scale) == 1.5305
    assert next(vae.parameters()).dtype == torch.float64
    x, y = latents(vae, dtype=torch.float64)
    loss = lpl.get_loss(x, y)
    assert loss.dtype == torch.float64
    want = fixed_oracle(vae, x, y, num_blocks=4, norm="shared", loss_type="mse", pow_law=False,
                        remove_outliers=True)
    torch.testing.assert_close(loss, sum(want) / 5, rtol=1e-10, atol=1e-12)
    lpl.half().double()
    assert float(lpl.shift) == 0.0609 and float(lpl.scale) == 1.5305


# ---------------------------------------------------------------- gradients, checkpointing, dtypes

def test_gradients_reach_the_input_latents_through_every_layer(vaes):
    vae = vaes["sdxl_like"]
    x, y = latents(vae)
    y.requires_grad_(True)
    hist = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True).get_loss(x, y, get_hist=True)
    for layer in hist:
        (g,) = torch.autograd.grad(layer.sum(), x, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    sum(hist).sum().backward()
    assert y.grad is None  # the target pass builds no graph


@pytest.mark.parametrize("name,granularity", [("sdxl_like", "module"), ("sdxl_like", "block"),
                                              ("wide", "module")])
def test_checkpointing_on_off_same_loss_and_gradient(vaes, name, granularity):
    vae = vaes[name]
    x, y = latents(vae)
    on = LatentPerceptualLoss(vae, grad_ckpt=True, norm_type="shared", pow_law=True,
                              checkpoint_granularity=granularity)
    off = LatentPerceptualLoss(vae, grad_ckpt=False, norm_type="shared", pow_law=True)
    a, b = on.get_loss(x, y), off.get_loss(x, y)
    assert_close_to_scale(a, b, rtol=1e-6)
    torch.testing.assert_close(grad_of(a, x), grad_of(b, x), rtol=1e-5, atol=1e-9)


def test_module_granularity_covers_the_diffusers_blocks(vaes):
    """Per-module checkpointing walks the same calls as the blocks' own forward."""
    vae = vaes["wide"]
    blocks = [vae.decoder.mid_block] + list(vae.decoder.up_blocks)
    h = torch.randn(1, blocks[0].resnets[0].in_channels, 4, 4)
    for block in blocks:
        steps = LatentPerceptualLoss._block_steps(block)
        assert steps is not None
        want = block(h, None)
        got = h
        for step in steps:
            got = step(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        h = want
    assert LatentPerceptualLoss._block_steps(torch.nn.Identity()) is None


def test_autocast_bf16_on_cpu(vaes):
    vae = vaes["sdxl_like"]
    x, y = latents(vae)
    plain = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True)
    fp32 = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True, decoder_fp32=True)
    want = plain.get_loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = plain.get_loss(x, y)
        full = fp32.get_loss(x, y)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, want, rtol=0.1, atol=1e-3)  # bf16 decoder: loose
    assert_close_to_scale(full, want, rtol=1e-6)  # decoder_fp32: the fp32 result
    g_low, g_full = grad_of(low, x), grad_of(full, x)
    assert torch.isfinite(g_low).all()
    assert_close_grad(g_full, grad_of(want, x), rtol=1e-5)


def test_decoder_fp32_rejects_a_half_vae():
    vae = tiny_vae("sdxl_like", dtype=torch.bfloat16)
    x, y = latents(vae, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="decoder_fp32"):
        LatentPerceptualLoss(vae, decoder_fp32=True).get_loss(x, y)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(loss_type="huber"), "loss_type"), (dict(norm_type="layer"), "norm_type"),
    (dict(num_mid_blocks=5), "num_mid_blocks"), (dict(feature_type="pixels"), "feature_type"),
    (dict(checkpoint_granularity="layer"), "checkpoint_granularity"),
])
def test_bad_options_name_the_argument(vaes, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        LatentPerceptualLoss(vaes["sdxl_like"], **kwargs)


def test_bad_inputs_name_the_argument(vaes):
    lpl = LatentPerceptualLoss(vaes["sdxl_like"])
    x, y = latents(vaes["sdxl_like"])
    with pytest.raises(ValueError, match="target"):
        lpl.get_loss(x, y[:1])
    with pytest.raises(ValueError, match="input"):
        lpl.get_loss(x[0], y[0])
    with pytest.raises(TypeError, match="vae"):
        LatentPerceptualLoss(torch.nn.Linear(2, 2))


def test_exported_from_the_package():
    assert lpl_ext.LatentPerceptualLoss is LatentPerceptualLoss


def test_compute_stats_off_gives_the_same_loss(vaes):
    vae = vaes["sdxl_like"]
    x, y = latents(vae)
    on = LatentPerceptualLoss(vae, norm_type="shared")
    off = LatentPerceptualLoss(vae, norm_type="shared", compute_stats=False)
    torch.testing.assert_close(off.get_loss(x, y), on.get_loss(x, y), rtol=0, atol=0)
    assert off.last_feature_stats == [] and len(on.last_feature_stats) == 5


@pytest.mark.parametrize("norm_type", ["batch", "shared"])
def test_masked_layers_hand_the_plane_moments_to_the_distance(vaes, monkeypatch, norm_type):
    """With the kernels, each masked layer's outlier mask returns its plane moments and the
    feature distance takes them (its own pass over the mask and y saved): the loss and the
    input gradient are those of the path without them within rounding (batch: its channel
    statistics merged from the planes' moments, another order of the sums; shared: the same
    integer kept counts, so the same bits)."""
    from lpl_ext import lpl_loss as lpl_loss_module

    vae = vaes["sdxl_like"]
    x, y = latents(vae)
    lpl = LatentPerceptualLoss(vae, norm_type=norm_type, remove_outliers=True, loss_type="l1")
    seen = []
    real = lpl_loss_module.feature_distance

    def spy(hx, hy, keep=None, **kwargs):
        seen.append((keep is not None, kwargs.get("plane_moments")))
        return real(hx, hy, keep, **kwargs)

    def loss_and_grad():
        xa = x.detach().clone().requires_grad_(True)
        out = lpl.get_loss(xa, y)
        (out * torch.tensor([1.5, -0.5])).sum().backward()
        return out.detach(), xa.grad, [dict(s) for s in lpl.last_feature_stats]

    with monkeypatch.context() as m:
        m.setattr(lpl_loss_module, "feature_distance", spy)
        loss, grad, stats = loss_and_grad()
    masked = [k for k, _ in seen]
    assert masked == [False, False, True, True, True]
    for is_masked, moments in seen:
        assert (moments is not None) == is_masked
        if moments is not None:
            assert moments.dtype == torch.float64 and moments.shape[1] == 3
    monkeypatch.setattr(lpl_loss_module, "plane_moments_pay_off", lambda device: False)
    want_loss, want_grad, want_stats = loss_and_grad()
    assert stats == want_stats  # the outlier mask's statistics do not change
    if norm_type == "batch":
        assert_close_to_scale(loss, want_loss, rtol=1e-6)
        assert_close_to_scale(grad, want_grad, rtol=1e-5)
    else:
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
