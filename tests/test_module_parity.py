"""Float64 parity of ``lpl_ext.LatentPerceptualLoss`` as a whole, on decoder features whose
outlier removal really removes pixels.

The tiny VAEs of these tests (``reference_lpl.blob_vae``) carry the blob artifacts of
real SD VAE decoders, so that layers 2, 3 and 4 lose about 1-4% of their pixels to the
outlier mask in every sample (asserted below): a module that passed the wrong margin or
windows to the mask, or ignored the mask, changes every comparison here. Everything runs
in float64, where the kernels accumulate in float64, so the losses and gradients are
compared at ~1e-10 instead of float32's 1e-4.

Per layer, for each option set, in fixed mode and in ``reference_compat``:
- the keep-mask the module hands to the distance kernel, bit for bit;
- the features it compares (prediction and target), the per-sample loss, the latent
  gradient of that layer's loss and the logged statistics.

Oracles:
- fixed mode: docs/spec.md ("Loss module", "Outlier mask", "Normalization", "Feature
  distance") composed from plain-PyTorch pieces
  (``reference.py``: kthvalue/std/max_pool2d mask, formula distance) on the decoder's own
  blocks, with post_quant_conv;
- compat mode: ``reference_lpl.ReferenceLPL`` (the restatement of the public reference)
  with ``fixed_where_undefined``;
- the public reference's own recorded outputs: per layer (``data/layer_*.npz``, run
  through the module on an identity decoder whose features are the recorded ones) and
  end to end through a decoder (``data/lpl_decoder_path.npz``, recorded by
  ``tools/record_reference_vectors.py``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional

import numpy as np
import pytest
import torch
from torch import nn

import lpl_ext.lpl_loss as lpl_loss_module
from lpl_ext import LatentPerceptualLoss
from reference import outlier_windows, ref_feature_distance, ref_outlier_mask
from reference_lpl import ReferenceLPL, blob_vae, plain_decoder_features
from tolerance import assert_close_to_scale

DATA = Path(__file__).parent / "data"
DOWN = {2: 2, 3: 1, 4: 1}  # masked layer -> down factor of its windows (docs/spec.md, "Outlier mask")
LATENT_SEED = 8  # target latents whose blobs trigger the outlier removal on layers 2-4 (>= 1% of every sample)
MIN_OUTLIER_RATIO = 0.008  # per sample and masked layer (the seed gives >= 1.0% in every case)

# float64 tolerances: reordered float64 sums through a decoder (measured ~1e-14 relative)
LOSS_RTOL = 1e-10
GRAD_RTOL = 1e-9


# ---------------------------------------------------------------- helpers

class DistanceSpy:
    """Records what LatentPerceptualLoss hands to the fused distance kernel, per layer:
    prediction features, target features and the keep-mask (None = every pixel kept)."""

    def __init__(self) -> None:
        self.calls: List[Dict[str, Optional[torch.Tensor]]] = []

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator["DistanceSpy"]:
        real = lpl_loss_module.feature_distance

        def spy(x, y, mask=None, **kwargs):
            self.calls.append({"x": x.detach().clone(), "y": y.detach().clone(),
                               "mask": None if mask is None else mask.detach().clone()})
            return real(x, y, mask, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(lpl_loss_module, "feature_distance", spy)
            yield self

    def masks(self) -> List[torch.Tensor]:
        """Per layer, the bool keep-mask (all true where the module passed none)."""
        return [torch.ones_like(c["y"], dtype=torch.bool) if c["mask"] is None else c["mask"].bool()
                for c in self.calls]


def blob_latents(vae: nn.Module, seed: int = LATENT_SEED, n: int = 2, hw: int = 8):
    """(prediction requiring grad, target) float64 latents; prediction = target + 0.5 noise."""
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    target = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    pred = target + 0.5 * torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    return pred.requires_grad_(True), target


def layer_grads(hist: List[torch.Tensor], x: torch.Tensor, grad_output: torch.Tensor) -> List[torch.Tensor]:
    """d(sum_n loss_i[n] * grad_output[n]) / dx for every layer i."""
    grads = []
    for i, loss in enumerate(hist):
        (g,) = torch.autograd.grad((loss * grad_output.to(loss.dtype)).sum(), x, retain_graph=True)
        grads.append(g)
    return grads


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, rtol: float = GRAD_RTOL, what: str = "") -> None:
    assert_close_to_scale(got, want, rtol=rtol, what=what)


def layer_stats(y: torch.Tensor, keep: Optional[torch.Tensor]) -> Dict[str, float]:
    """docs/spec.md "Layer statistics" in float64: mean and unbiased std of the
    masked target features, outlier ratio 1 - mean(keep)."""
    ym = y if keep is None else torch.where(keep, y, torch.zeros_like(y))
    std, mean = torch.std_mean(ym.double())
    ratio = 0.0 if keep is None else 1.0 - keep.double().mean().item()
    return {"mean": mean.item(), "std": std.item(), "outlier_ratio": ratio}


def assert_stats_close(got: Dict, want: Dict[str, float], what: str) -> None:
    """The module logs float32 statistics: compare at float32 resolution."""
    for key in ("mean", "std", "outlier_ratio"):
        g = float(got[key])
        assert g == pytest.approx(want[key], rel=2e-6, abs=2e-7 * max(1.0, abs(want["std"]))), f"{what} {key}"


def fixed_oracle(vae: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_blocks: int, norm: str,
                 loss_type: str, pow_law: bool, remove_outliers: bool) -> List[Dict]:
    """docs/spec.md, "Loss module", from plain-PyTorch pieces, per layer: features, mask,
    loss (N,) float64 (differentiable in x) and statistics. The features and the mask are
    computed in the VAE's dtype, as the module does; the distance always in float64."""
    s, b = vae.config.scaling_factor, (vae.config.shift_factor or 0.0)
    fx = plain_decoder_features(vae, x / s + b, num_blocks)
    with torch.no_grad():
        fy = plain_decoder_features(vae, y / s + b, num_blocks)
    layers = []
    for i, (a, t) in enumerate(zip(fx, fy)):
        keep = None
        if remove_outliers and i in DOWN:
            closing, opening = outlier_windows(DOWN[i])
            keep = ref_outlier_mask(t, closing=closing, opening=opening)
        w = 2.0 ** -min(i, 3) if pow_law else 1.0
        layers.append({"x": a.detach(), "y": t, "mask": torch.ones_like(t, dtype=torch.bool) if keep is None else keep,
                       "loss": ref_feature_distance(a.double(), t.double(), keep, norm=norm, distance=loss_type,
                                                    weight=w),
                       "stats": layer_stats(t, keep)})
    return layers


def compat_oracle(vae: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> List[Dict]:
    """The restatement of the public reference, with lpl_ext's fixes where it is undefined."""
    ref = ReferenceLPL(vae, fixed_where_undefined=True, **options)
    return [{"mask": mask, "loss": loss, "stats": stats} for loss, stats, mask in ref.layer_outputs(x, y)]


def assert_outliers_trigger(masks: List[torch.Tensor], layers=(2, 3, 4)) -> None:
    """Every sample loses a substantial share of its pixels on every masked layer."""
    for i in layers:
        ratios = [1.0 - masks[i][n].double().mean().item() for n in range(masks[i].shape[0])]
        assert min(ratios) >= MIN_OUTLIER_RATIO, f"layer {i}: outlier ratio per sample {ratios}"


# ---------------------------------------------------------------- decoder-path parity

@pytest.fixture(scope="module")
def vaes() -> Dict[str, nn.Module]:
    return {name: blob_vae(name) for name in ("sdxl_like", "shifted", "wide")}


FIXED_CASES = [
    ("sdxl_like", dict(norm_type="shared", loss_type="mse", pow_law=True)),
    ("shifted", dict(norm_type="default", loss_type="l1", grad_ckpt=False)),
    ("wide", dict(norm_type="batch", loss_type="mse", pow_law=True, checkpoint_granularity="block")),
    ("sdxl_like", dict(norm_type="none", loss_type="l1", num_mid_blocks=3)),
]


@pytest.mark.parametrize("name,opts", FIXED_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items()))
def test_fixed_mode_float64_parity(vaes, monkeypatch, name, opts):
    vae = vaes[name]
    x, y = blob_latents(vae)
    num_blocks = opts.get("num_mid_blocks", 4)
    lpl = LatentPerceptualLoss(vae, **opts)
    with DistanceSpy().installed(monkeypatch) as spy:
        hist = lpl.get_loss(x, y, get_hist=True)
    want = fixed_oracle(vae, x, y, num_blocks=num_blocks, norm=opts["norm_type"], loss_type=opts["loss_type"],
                        pow_law=opts.get("pow_law", False), remove_outliers=opts.get("remove_outliers", True))
    assert len(hist) == len(spy.calls) == len(want) == 1 + num_blocks
    masks = spy.masks()
    assert_outliers_trigger(masks, [i for i in DOWN if i <= num_blocks])
    go = torch.tensor([0.75, -1.25], dtype=torch.float64)
    got_grads = layer_grads(hist, x, go)
    want_grads = layer_grads([w["loss"] for w in want], x, go)
    for i, w in enumerate(want):
        call = spy.calls[i]
        assert torch.equal(masks[i], w["mask"]), f"layer {i}: keep-mask differs at {(masks[i] != w['mask']).sum()} pixels"
        assert_close_to_scale(call["x"], w["x"], rtol=1e-13)
        assert_close_to_scale(call["y"], w["y"], rtol=1e-13)
        assert hist[i].dtype == torch.float64
        assert_close_to_scale(hist[i], w["loss"].detach(), rtol=LOSS_RTOL, what=f"layer {i} loss")
        assert_grad_close(got_grads[i], want_grads[i], what=f"layer {i} latent gradient")
        assert_stats_close(lpl.last_feature_stats[i], w["stats"], f"layer {i}")
    # the total is the mean of the layers, and its gradient their mean
    total = lpl.get_loss(x, y)
    assert_close_to_scale(total, sum(w["loss"].detach() for w in want) / len(want), rtol=LOSS_RTOL)
    (g_total,) = torch.autograd.grad(total.sum(), x)
    assert_grad_close(g_total, sum(layer_grads([w["loss"] for w in want], x, torch.ones(2, dtype=torch.float64)))
                      / len(want), what="total latent gradient")


COMPAT_CASES = [
    ("sdxl_like", dict(norm_type="shared", loss_type="mse", pow_law=True)),
    ("shifted", dict(norm_type="batch", loss_type="l1")),
    ("wide", dict(norm_type="default", loss_type="mse", grad_ckpt=False)),
    ("sdxl_like", dict(norm_type="default", loss_type="l1", pow_law=True, num_mid_blocks=3)),
]


@pytest.mark.parametrize("name,opts", COMPAT_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items()))
def test_compat_mode_float64_parity(vaes, monkeypatch, name, opts):
    vae = vaes[name]
    x, y = blob_latents(vae)
    num_blocks = opts.get("num_mid_blocks", 4)
    lpl = LatentPerceptualLoss(vae, reference_compat=True, **opts)
    with DistanceSpy().installed(monkeypatch) as spy:
        hist = lpl.get_loss(x, y, get_hist=True)
    want = compat_oracle(vae, x, y, **opts)
    assert len(hist) == len(want) == 1 + num_blocks
    masks = spy.masks()
    assert_outliers_trigger(masks, [i for i in DOWN if i <= num_blocks])
    go = torch.tensor([-0.5, 1.5], dtype=torch.float64)
    got_grads = layer_grads(hist, x, go)
    want_grads = layer_grads([w["loss"] for w in want], x, go)
    for i, w in enumerate(want):
        assert torch.equal(masks[i], w["mask"]), f"layer {i}: keep-mask differs at {(masks[i] != w['mask']).sum()} pixels"
        assert_close_to_scale(hist[i], w["loss"].detach(), rtol=LOSS_RTOL, what=f"layer {i} loss")
        assert_grad_close(got_grads[i], want_grads[i], what=f"layer {i} latent gradient")
        assert_stats_close(lpl.last_feature_stats[i], w["stats"], f"layer {i}")


def test_fixed_and_compat_masks_agree_and_post_quant_conv_separates_them(vaes, monkeypatch):
    """Without post_quant_conv (the shifted VAE) both modes see the same features and keep
    the same pixels; with it (sdxl_like) the compat features are the reference's, not the
    real decode path's, so their masks differ."""
    for name, same in (("shifted", True), ("sdxl_like", False)):
        vae = vaes[name]
        x, y = blob_latents(vae)
        masks = {}
        for compat in (False, True):
            with DistanceSpy().installed(monkeypatch) as spy:
                LatentPerceptualLoss(vae, norm_type="shared", reference_compat=compat).get_loss(x, y)
            masks[compat] = spy.masks()
        for i in DOWN:
            assert torch.equal(masks[False][i], masks[True][i]) == same, (name, i)


# ---------------------------------------------------------------- recorded reference: single layers

class _Identity(nn.Module):
    """A decoder block that returns its input (one unused float64 parameter gives the
    decoder a dtype and a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def forward(self, h: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return h


class IdentityVAE(nn.Module):
    """A VAE whose decoder features are its latents at every level: scale 1, shift 0, no
    post_quant_conv, every block the identity. Layer i of the loss then compares exactly
    the features a recorded vector holds, with the module's own choice of mask, windows,
    layer weight and norm for layer index i."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.conv_in = _Identity()
        self.decoder.mid_block = _Identity()
        self.decoder.up_blocks = nn.ModuleList([_Identity() for _ in range(4)])
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)


def _layer_vectors() -> List[Dict]:
    return [e for e in json.loads((DATA / "index.json").read_text()) if e["kind"] == "layer_loss"]


def _run_recorded_layer(entry: Dict, compat: bool, monkeypatch) -> Dict:
    """The module's layer ``layer_index`` on the recorded features: loss, gradient, mask."""
    d = np.load(DATA / entry["file"])
    k = entry["layer_index"]
    lpl = LatentPerceptualLoss(IdentityVAE(), loss_type=entry["loss_type"], norm_type=entry["norm_type"],
                               pow_law=entry["pow_law"], remove_outliers=entry["remove_outliers"],
                               num_mid_blocks=k, reference_compat=compat)
    x = torch.from_numpy(d["x"]).requires_grad_(True)
    y = torch.from_numpy(d["y"])
    with DistanceSpy().installed(monkeypatch) as spy:
        hist = lpl.get_loss(x, y, get_hist=True)
    assert len(hist) == k + 1
    go = torch.from_numpy(d["grad_output"])
    (grad,) = torch.autograd.grad((hist[k] * go).sum(), x)
    return {"data": d, "loss": hist[k].detach(), "grad": grad, "mask": spy.masks()[k],
            "stats": lpl.last_feature_stats[k]}


@pytest.mark.parametrize("entry", _layer_vectors(), ids=lambda e: e["file"])
def test_compat_module_matches_recorded_reference_layers(entry, monkeypatch):
    """Every recorded layer of the public reference (norm 'batch' included: the reference
    normalizes nothing there, and so does compat mode), through the whole module."""
    got = _run_recorded_layer(entry, True, monkeypatch)
    d = got["data"]
    assert torch.equal(got["mask"], torch.from_numpy(d["keep"]))
    assert_close_to_scale(got["loss"], torch.from_numpy(d["loss"]), rtol=LOSS_RTOL)
    assert_grad_close(got["grad"], torch.from_numpy(d["grad_x"]), what="gradient")
    ratio = 1.0 - d["keep"].mean()
    assert float(got["stats"]["outlier_ratio"]) == pytest.approx(ratio, abs=2e-7)


@pytest.mark.parametrize("entry", _layer_vectors(), ids=lambda e: e["file"])
def test_fixed_module_matches_recorded_reference_layers(entry, monkeypatch):
    """Fixed mode agrees with the reference wherever the reference is right (every norm
    but 'batch', no fully masked plane); its 'batch' standardizes with the recorded mask."""
    got = _run_recorded_layer(entry, False, monkeypatch)
    d = got["data"]
    keep = torch.from_numpy(d["keep"])
    assert keep.sum((2, 3)).min() > 0  # no 0/0 plane in the recorded cases
    assert torch.equal(got["mask"], keep)
    if entry["norm_type"] != "batch":
        want_loss, want_grad = torch.from_numpy(d["loss"]), torch.from_numpy(d["grad_x"])
    else:
        xr = torch.from_numpy(d["x"]).requires_grad_(True)
        w = 2.0 ** -min(entry["layer_index"], 3) if entry["pow_law"] else 1.0
        want_loss = ref_feature_distance(xr, torch.from_numpy(d["y"]), keep, norm="batch",
                                         distance=entry["loss_type"], weight=w)
        (want_grad,) = torch.autograd.grad((want_loss * torch.from_numpy(d["grad_output"])).sum(), xr)
        want_loss = want_loss.detach()
        assert not torch.allclose(want_loss, torch.from_numpy(d["loss"]), rtol=1e-3)
    assert_close_to_scale(got["loss"], want_loss, rtol=LOSS_RTOL)
    assert_grad_close(got["grad"], want_grad, what="gradient")


def test_recorded_layers_exercise_the_outlier_mask():
    """The recorded vectors the module runs above do remove outliers on layers 2-4."""
    for entry in _layer_vectors():
        removed = 1.0 - np.load(DATA / entry["file"])["keep"].mean()
        if entry["remove_outliers"] and entry["layer_index"] in DOWN:
            assert removed > 0.02, entry["file"]
        else:
            assert removed == 0.0, entry["file"]


# ---------------------------------------------------------------- recorded reference: decoder path

def _decoder_path_runs() -> List[Dict]:
    with np.load(DATA / "lpl_decoder_path.npz") as d:
        return json.loads(str(d["runs"]))


@pytest.fixture(scope="module")
def decoder_path():
    with np.load(DATA / "lpl_decoder_path.npz") as d:
        return {k: d[k] for k in d.files}


def _recorded_vae(data: Dict, dtype: str) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # encoder and output layers are not stored and not used
    vae = AutoencoderKL(**json.loads(str(data["config"]))).eval()
    weights = {k[2:]: torch.from_numpy(v) for k, v in data.items() if k.startswith("w/")}
    missing = [k for k in vae.state_dict() if k.startswith(("post_quant_conv.", "decoder.conv_in.",
                                                            "decoder.mid_block.", "decoder.up_blocks."))
               and k not in weights]
    assert not missing
    vae.load_state_dict(weights, strict=False)
    nn.Module.to(vae, torch.float64)
    if dtype == "upcast":  # diffusers' upcast_vae layout: conv_in and mid block below the up blocks
        vae.decoder.conv_in.float()
        vae.decoder.mid_block.float()
    return vae


@pytest.mark.parametrize("run", _decoder_path_runs(), ids=lambda r: r["name"])
def test_compat_matches_the_recorded_reference_decoder_path(decoder_path, monkeypatch, run):
    """The public reference's own end-to-end outputs (post_quant_conv skipped, z / scale +
    shift into conv_in, the mid-block output cast to the up blocks' dtype, outliers
    removed on layers 2-4), reproduced by compat mode: masks bit for bit, per-layer losses,
    latent gradients and statistics."""
    vae = _recorded_vae(decoder_path, run["dtype"])
    p = run["name"] + "/"
    x = torch.from_numpy(decoder_path[p + "input"]).requires_grad_(True)
    y = torch.from_numpy(decoder_path[p + "target"])
    go = torch.from_numpy(decoder_path[p + "grad_output"])
    lpl = LatentPerceptualLoss(vae, reference_compat=True, **run["options"])
    with DistanceSpy().installed(monkeypatch) as spy:
        hist = lpl.get_loss(x, y, get_hist=True)
    grads = layer_grads(hist, x, go)
    masks = spy.masks()
    assert_outliers_trigger(masks)
    # The upcast layout computes conv_in and the mid block in float32; its losses and latent
    # gradients carry float32 rounding, and which float32 convolution kernel rounds them
    # depends on the CPU (the recording's or this one's): float32 tolerances there.
    loss_rtol = LOSS_RTOL if run["dtype"] == "float64" else 1e-5
    grad_rtol = GRAD_RTOL if run["dtype"] == "float64" else 1e-5
    recorded_stats = decoder_path[p + "stats"]
    for i in range(5):
        if i in DOWN:
            assert torch.equal(masks[i], torch.from_numpy(decoder_path[p + f"keep{i}"])), f"layer {i} mask"
        else:
            assert masks[i].all()
        assert_close_to_scale(hist[i], torch.from_numpy(decoder_path[p + f"loss{i}"]), rtol=loss_rtol,
                              what=f"layer {i} loss")
        assert_grad_close(grads[i], torch.from_numpy(decoder_path[p + f"grad{i}"]), rtol=grad_rtol,
                          what=f"layer {i} latent gradient")
        assert_stats_close(lpl.last_feature_stats[i], dict(zip(("mean", "std", "outlier_ratio"), recorded_stats[i])),
                           f"layer {i}")


def test_recorded_decoder_path_restatement_agrees(decoder_path):
    """tests/reference_lpl.py restates the reference: on the recorded float64 decoder run it
    reproduces the recorded losses (the restatement is the oracle of the tests above)."""
    run = _decoder_path_runs()[0]
    assert run["dtype"] == "float64"
    vae = _recorded_vae(decoder_path, "float64")
    p = run["name"] + "/"
    outputs = ReferenceLPL(vae, **run["options"]).layer_outputs(torch.from_numpy(decoder_path[p + "input"]),
                                                                torch.from_numpy(decoder_path[p + "target"]))
    for i, (loss, _, mask) in enumerate(outputs):
        assert_close_to_scale(loss.detach(), torch.from_numpy(decoder_path[p + f"loss{i}"]), rtol=1e-12)
        if i in DOWN:
            assert torch.equal(mask, torch.from_numpy(decoder_path[p + f"keep{i}"]))
