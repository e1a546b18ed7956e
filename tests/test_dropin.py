"""LatentPerceptualLoss as a drop-in for code written against the public reference
(diffusers examples/research_projects/lpl/lpl_loss.py): statistics as plain floats, the
caller's VAE left untouched, and the reference's other members and module functions.

Oracles: tests/reference_lpl.py (plain-PyTorch restatement of the reference class and of
its remove_outliers), and the reference's formulas written out below with diffusers'
decoder modules.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lpl_ext
from lpl_ext import LatentPerceptualLoss
from lpl_ext import lpl_loss as lpl_module
from reference_lpl import ReferenceLPL, reference_remove_outliers, tiny_vae
from tolerance import assert_close_to_scale
from test_lpl_loss import SyncCounter

CUDA = lpl_ext.build_info()["cuda_available"]


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), kwargs or {}, args))
        return func(*args, **(kwargs or {}))

    def names(self):
        return [c[0] for c in self.calls]


def latents(vae, n=2, hw=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    x = torch.randn(n, c, hw, hw, generator=g)
    y = x + 0.5 * torch.randn(n, c, hw, hw, generator=g)
    return x.requires_grad_(True), y


# ---------------------------------------------------------------- statistics

def test_stats_are_plain_floats_that_any_logger_accepts():
    vae = tiny_vae("sdxl_like")
    lpl = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True)
    x, y = latents(vae)
    lpl.get_loss(x, y).sum().backward()
    stats = lpl.last_feature_stats
    assert len(stats) == 5
    for layer, tensors in zip(stats, lpl.last_feature_stats_tensors):
        assert set(layer) == {"mean", "std", "outlier_ratio"}
        assert all(type(v) is float for v in layer.values())
        for key, value in layer.items():
            assert value == float(tensors[key])
    assert json.loads(json.dumps(stats)) == stats


def test_stats_are_converted_once_with_one_batched_copy_and_only_when_read():
    vae = tiny_vae("sdxl_like")
    lpl = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True)
    x, y = latents(vae)
    with SyncCounter() as counter:
        lpl.get_loss(x, y).sum().backward()
    assert counter.ours() == []  # nobody read them: no sync
    with OpRecorder() as first:
        stats = lpl.last_feature_stats
    # All 15 values stacked into one tensor and copied at once, no per-value .item().
    assert first.names().count("aten.stack") == 1
    assert not any(n in ("aten._local_scalar_dense", "aten.item") for n in first.names())
    with OpRecorder() as second:
        again = lpl.last_feature_stats
    assert second.names() == [] and again is stats
    # A new call replaces them; the reference's reset idiom still works.
    lpl.get_loss(x.detach(), y * 2)
    assert lpl.last_feature_stats != stats
    lpl.last_feature_stats = []
    assert lpl.last_feature_stats == [] and lpl.last_feature_stats_tensors == []


def test_compat_stats_equal_the_reference_floats():
    vae = tiny_vae("wide")
    x, y = latents(vae)
    ref = ReferenceLPL(vae, norm_type="default", pow_law=True)
    ours = LatentPerceptualLoss(vae, norm_type="default", pow_law=True, reference_compat=True)
    with torch.no_grad():
        ref.get_loss(x, y)
        ours.get_loss(x, y)
    assert len(ours.last_feature_stats) == len(ref.last_feature_stats) == 5
    for got, want in zip(ours.last_feature_stats, ref.last_feature_stats):
        assert set(got) == set(want)
        for key in want:
            assert type(got[key]) is float
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of lpl_ext")
def test_stats_read_on_cuda_is_one_device_to_host_copy():
    vae = tiny_vae("sdxl_like").cuda()
    lpl = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True)
    x, y = latents(vae)
    lpl.get_loss(x.cuda(), y.cuda())
    with OpRecorder() as rec:
        stats = lpl.last_feature_stats
    to_host = [c for c in rec.calls if c[0] in ("aten._to_copy", "aten.copy_")
               and str(c[1].get("device", "")) == "cpu"]
    assert len(to_host) == 1 and "aten._local_scalar_dense" not in rec.names()
    assert all(type(v) is float for layer in stats for v in layer.values())


# ---------------------------------------------------------------- the caller's VAE

def test_the_callers_vae_is_not_mutated_and_gets_no_gradient():
    vae = tiny_vae("sdxl_like", seed=5)
    vae.decoder.up_blocks[1].requires_grad_(False)  # a caller's own mixed freezing
    flags = {n: p.requires_grad for n, p in vae.named_parameters()}
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    training = {n: m.training for n, m in vae.named_modules()}
    assert any(flags.values()) and not all(flags.values())
    x, y = latents(vae)
    for granularity in ("module", "block"):
        lpl = LatentPerceptualLoss(vae, norm_type="shared", pow_law=True, grad_ckpt=True,
                                   checkpoint_granularity=granularity)
        loss = lpl.get_loss(x, y)
        (gx,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(gx).all() and gx.abs().sum() > 0
        lpl.get_loss(x, y).sum().backward()
        assert all(p.grad is None for p in vae.parameters())
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags
    assert {n: m.training for n, m in vae.named_modules()} == training
    for n, p in vae.named_parameters():
        assert torch.equal(p, before[n])
    # The input gradient is the one a caller-frozen VAE gives.
    frozen = tiny_vae("sdxl_like", seed=5).requires_grad_(False)
    want = LatentPerceptualLoss(frozen, norm_type="shared", pow_law=True).get_loss(x, y)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, g_want, rtol=1e-6, atol=1e-9)


def test_freeze_vae_false_trains_the_vae_like_the_reference():
    vae = tiny_vae("sdxl_like", seed=6)
    x, y = latents(vae)
    ReferenceLPL(vae, norm_type="shared", pow_law=True).get_loss(x, y).mean().backward()
    want = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    LatentPerceptualLoss(vae, norm_type="shared", pow_law=True, reference_compat=True,
                         freeze_vae=False).get_loss(x, y).mean().backward()
    got = {n: p.grad for n, p in vae.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 10
    scale = max(float(g.abs().max()) for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6 * scale)


def test_image_feature_type_leaves_a_trainable_vae_without_gradient():
    vae = tiny_vae("sdxl_like", seed=7)
    x, y = latents(vae)
    for compat in (False, True):
        lpl = LatentPerceptualLoss(vae, feature_type="image", reference_compat=compat)
        loss = lpl.get_loss(x, y)
        loss.sum().backward()
        assert all(p.grad is None for p in vae.parameters())
        frozen = tiny_vae("sdxl_like", seed=7).requires_grad_(False)
        want = LatentPerceptualLoss(frozen, feature_type="image", reference_compat=compat).get_loss(x, y)
        assert_close_to_scale(loss, want, rtol=1e-6)


# ---------------------------------------------------------------- members of the reference class

def test_loss_fn_is_the_references_elementwise_module():
    vae = tiny_vae("sdxl_like")
    mse = LatentPerceptualLoss(vae, loss_type="mse").loss_fn
    l1 = LatentPerceptualLoss(vae, loss_type="l1").loss_fn
    assert isinstance(mse, torch.nn.MSELoss) and mse.reduction == "none"
    assert isinstance(l1, torch.nn.L1Loss) and l1.reduction == "none"
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(mse(a, b), torch.tensor([0.25, 9.0]))
    torch.testing.assert_close(l1(a, b), torch.tensor([0.5, 3.0]))
    lpl = LatentPerceptualLoss(vae)
    assert list(lpl.parameters()) == [] and lpl.state_dict() == {}


def manual_features(vae, z, num_blocks, temb, *, post_quant_conv, cast_mid):
    """The reference's get_features written out, with latent_embeds as the blocks' temb."""
    dec = vae.decoder
    if post_quant_conv:
        z = vae.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z), temb)
    if cast_mid:
        h = h.to(next(iter(dec.up_blocks.parameters())).dtype)
    out = [h]
    for block in list(dec.up_blocks)[:num_blocks]:
        h = block(h, temb)
        out.append(h)
    return out


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_get_features_passes_latent_embeds_to_the_blocks(compat, grad_ckpt):
    vae = tiny_vae("sdxl_like", seed=8).requires_grad_(False)
    lpl = LatentPerceptualLoss(vae, num_mid_blocks=3, reference_compat=compat, grad_ckpt=grad_ckpt)
    x, _ = latents(vae)
    temb = torch.tensor([0.3, -0.7]).view(2, 1, 1, 1)
    got = lpl.get_features(x, latent_embeds=temb)
    want = manual_features(vae, x, 3, temb, post_quant_conv=not compat, cast_mid=compat)
    plain = lpl.get_features(x)
    assert len(got) == len(want) == 4
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(g, p)  # the embedding did change the features
    (gx,) = torch.autograd.grad(sum(f.square().sum() for f in got), x)
    (wx,) = torch.autograd.grad(sum(f.square().sum() for f in want), x)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-7)
    assert not any(f.requires_grad for f in lpl.get_features(x, latent_embeds=temb, disable_grads=True))
    with pytest.raises(TypeError, match="latent_embeds"):
        lpl.get_features(x, latent_embeds=[0.3])


@pytest.mark.parametrize("compat", [False, True])
def test_get_first_conv_block_and_layer_follow_the_reference(compat):
    vae = tiny_vae("sdxl_like", seed=9)
    lpl = LatentPerceptualLoss(vae, reference_compat=compat)
    x, y = latents(vae)
    dec = vae.decoder

    def stem(z):  # the reference skips post_quant_conv; the fixed mode applies it
        return dec.conv_in(z if compat else vae.post_quant_conv(z))

    def first_block(z):
        h = dec.mid_block(stem(z))
        for resnet in dec.up_blocks[0].resnets:
            h = resnet(h, None)
        return h

    torch.testing.assert_close(lpl.get_first_conv(x), stem(x), rtol=0, atol=0)
    torch.testing.assert_close(lpl.get_first_block(x), first_block(x), rtol=1e-6, atol=1e-7)
    assert lpl.get_first_block(x).shape[-1] == x.shape[-1]  # up block 0 without its upsampler
    for layer, feats in (("conv", stem), ("block", first_block)):
        a, b = feats(x), feats(y)
        d = b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10
        want = ((a / d - b / d) ** 2).mean()
        got = lpl.get_first_layer(x, y, target_layer=layer)
        assert got.dim() == 0
        assert_close_to_scale(got, want, rtol=1e-5)
        (g_got,) = torch.autograd.grad(got, x)
        (g_want,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in vae.parameters())
    with pytest.raises(ValueError, match="target_layer"):
        lpl.get_first_layer(x, y, target_layer="mid")
    with pytest.raises(ValueError, match="target"):
        lpl.get_first_layer(x, y[:1])


# ---------------------------------------------------------------- module-level functions

def test_module_functions_are_importable_like_the_reference():
    for name in ("normalize_tensor", "cross_normalize", "remove_outliers", "LatentPerceptualLoss"):
        assert getattr(lpl_ext, name) is getattr(lpl_module, name)
    from lpl_ext.lpl_loss import cross_normalize, normalize_tensor, remove_outliers  # noqa: F401


def test_normalize_tensor_and_cross_normalize():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    assert_close_to_scale(lpl_ext.normalize_tensor(a), a / (norm_a + 1e-10), rtol=1e-14)
    assert_close_to_scale(lpl_ext.normalize_tensor(a, eps=0.5), a / (norm_a + 0.5), rtol=1e-14)
    # Unit channel norm per pixel.
    assert_close_to_scale(torch.linalg.vector_norm(lpl_ext.normalize_tensor(a), dim=1),
                          torch.ones(2, 3, 4, dtype=torch.float64), rtol=1e-9)
    ca, cb = lpl_ext.cross_normalize(a, b)
    assert_close_to_scale(ca, a / (norm_b + 1e-10), rtol=1e-14)
    assert_close_to_scale(cb, b / (norm_b + 1e-10), rtol=1e-14)
    ca, cb = lpl_ext.cross_normalize(a, b, eps=1e-6)
    assert_close_to_scale(ca, a / (norm_b + 1e-6), rtol=1e-14)
    # Gradients flow to both arguments, as in the reference.
    ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    sum(t.sum() for t in lpl_ext.cross_normalize(ar, br)).backward()
    assert ar.grad is not None and br.grad is not None and br.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="target"):
        lpl_ext.cross_normalize(a, b.numpy())
    with pytest.raises(TypeError, match="in_feat"):
        lpl_ext.normalize_tensor(a.numpy())


@pytest.mark.parametrize("down_f,opening,closing", [(1, 5, 3), (2, 5, 3), (3, 5, 3), (1, 3, 1), (2, 9, 5)])
def test_remove_outliers_matches_the_reference(down_f, opening, closing):
    g = torch.Generator().manual_seed(down_f * 10 + opening)
    feat = torch.randn(2, 3, 24, 20, generator=g)
    # 3x3 outlier blocks (9 of 480 values: inside the 2% tails), wide enough for the
    # center to survive a closing of 3.
    feat[0, 1, 4:7, 4:7] = 25.0
    feat[1, 2, 10:13, 0:3] = -30.0
    feat.requires_grad_(True)
    mask, kept = lpl_ext.remove_outliers(feat, down_f=down_f, opening=opening, closing=closing, m=7)
    # The restatement takes the reference's default windows; other windows are written
    # out from its rule (ceil(w / d); an opening of 2 -> 3, a closing of 2 -> 1).
    if (opening, closing) == (5, 3):
        want_mask, want_kept = reference_remove_outliers(feat.detach(), down_f)
    else:
        want_mask = reference_mask_with_windows(feat.detach(), down_f, opening, closing)
        want_kept = feat.detach() * want_mask
    assert mask.dtype == torch.bool and mask.shape == feat.shape
    torch.testing.assert_close(mask, want_mask, rtol=0, atol=0)
    torch.testing.assert_close(kept.detach(), want_kept, rtol=0, atol=0)
    assert (~mask).any() and mask.any()
    (grad,) = torch.autograd.grad(kept.sum(), feat)
    torch.testing.assert_close(grad, mask.float(), rtol=0, atol=0)  # feat * mask, the mask a constant


def reference_mask_with_windows(feat, down_f, opening, closing):
    import math

    opening, closing = math.ceil(opening / down_f), math.ceil(closing / down_f)
    opening = 3 if opening == 2 else opening
    closing = 1 if closing == 2 else closing
    flat = feat.flatten(-2, -1)
    length = flat.shape[-1]
    q1 = flat.kthvalue(int(length * 0.02), dim=-1).values[..., None, None]
    q2 = flat.kthvalue(int(length * 0.98), dim=-1).values[..., None, None]
    m = 2 * flat.std(-1)[..., None, None]
    mask = ((q1 - m < feat) & (feat < q2 + m)).float()
    mask = F.max_pool2d(mask, closing, stride=1, padding=(closing - 1) // 2)
    return (-F.max_pool2d(-mask, opening, stride=1, padding=(opening - 1) // 2)).bool()


def test_remove_outliers_is_defined_where_the_reference_crashes():
    feat = torch.randn(1, 2, 4, 4)  # 16 values per plane: the reference's kthvalue(0) raises
    with pytest.raises(RuntimeError):
        reference_remove_outliers(feat, 1)
    mask, kept = lpl_ext.remove_outliers(feat)
    assert mask.shape == feat.shape and torch.equal(kept, feat * mask)
    # (C, H, W) features work as with the reference's max_pool2d.
    feat3 = torch.randn(3, 10, 10)
    mask3, _ = lpl_ext.remove_outliers(feat3)
    mask4, _ = lpl_ext.remove_outliers(feat3.unsqueeze(0))
    assert torch.equal(mask3, mask4[0])
    with pytest.raises(ValueError, match="feat"):
        lpl_ext.remove_outliers(torch.randn(10, 10))
    with pytest.raises(ValueError, match="down_f"):
        lpl_ext.remove_outliers(feat3, down_f=0)
    with pytest.raises(ValueError, match="opening"):
        lpl_ext.remove_outliers(feat3, opening=4)  # an even window (the reference changes the shape)


# ---------------------------------------------------------------- the reference's call pattern, both modes

class ReferenceWithPostQuantConv(ReferenceLPL):
    """The reference restatement with the one documented difference of lpl_ext's default
    mode for norms other than 'batch' (docs/switching.md): post_quant_conv applied to the
    decoder input before conv_in."""

    def get_features(self, z, disable_grads=False):
        with torch.set_grad_enabled(not disable_grads):
            z = self.vae.post_quant_conv(z)
        return super().get_features(z, disable_grads)


CALL_PATTERN_FLAGS = [
    dict(loss_type="mse", norm_type="shared", pow_law=True),
    dict(loss_type="l1", norm_type="default", pow_law=False, grad_ckpt=False),
    dict(loss_type="mse", norm_type="default", pow_law=True, remove_outliers=False, num_mid_blocks=3),
]


@pytest.mark.parametrize("compat", [True, False], ids=["compat", "default"])
@pytest.mark.parametrize("flags", CALL_PATTERN_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_reference_call_pattern_differs_only_as_documented(flags, compat):
    """What a script written against the reference calls -- the constructor, ``.to()``,
    ``.vae``, ``get_loss(input, target, get_hist=...)``, ``last_feature_stats`` -- in both
    modes (float64, on a VAE whose outlier removal removes pixels). Compat mode is the
    reference; default mode is the reference with post_quant_conv applied, and nothing
    else; the module's state is the documented one."""
    from reference_lpl import blob_vae

    vae = blob_vae("sdxl_like", seed=2).requires_grad_(False)
    ours = LatentPerceptualLoss(vae, reference_compat=compat, **flags)
    oracle = (ReferenceLPL if compat else ReferenceWithPostQuantConv)(vae, fixed_where_undefined=True, **flags)
    plain = ReferenceLPL(vae, fixed_where_undefined=True, **flags)
    assert ours.to("cpu") is ours and ours.vae is vae and ours.decoder is vae.decoder
    g = torch.Generator().manual_seed(8)
    y = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x = (y + 0.5 * torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)).requires_grad_(True)

    hist = ours.get_loss(x, y, get_hist=True)
    want_hist = oracle.get_loss(x, y, get_hist=True)
    assert isinstance(hist, list) and len(hist) == len(want_hist) == 1 + flags.get("num_mid_blocks", 4)
    for i, (got, want) in enumerate(zip(hist, want_hist)):
        assert got.shape == want.shape == (2,)
        assert_close_to_scale(got.detach(), want.detach(), rtol=1e-10, what=f"layer {i}")
    stats, want_stats = ours.last_feature_stats, oracle.last_feature_stats
    assert [set(s) for s in stats] == [set(s) for s in want_stats]
    for got, want in zip(stats, want_stats):
        for key in want:  # the module logs float32 statistics
            assert type(got[key]) is float and got[key] == pytest.approx(want[key], rel=2e-6, abs=2e-7)
    if flags.get("remove_outliers", True):
        assert max(s["outlier_ratio"] for s in stats) > 0.005  # the masks did remove pixels

    total, want_total = ours.get_loss(x, y), oracle.get_loss(x, y)
    assert total.shape == want_total.shape == (2,)
    assert_close_to_scale(total.detach(), want_total.detach(), rtol=1e-10, what="loss")
    (g_got,) = torch.autograd.grad(total.mean(), x)
    (g_want,) = torch.autograd.grad(want_total.mean(), x)
    assert_close_to_scale(g_got, g_want, rtol=1e-9, what="latent gradient")
    if not compat:  # post_quant_conv is a real difference: without it the loss is another one
        assert not torch.allclose(total.detach(), plain.get_loss(x, y).detach(), rtol=1e-3)

    # the documented state: no parameters, no state_dict keys, two non-persistent buffers
    assert len(list(oracle.parameters())) > 0 and any(k.startswith("vae.") for k in oracle.state_dict())
    assert list(ours.parameters()) == [] and ours.state_dict() == {}
    assert {n for n, _ in ours.named_buffers()} == {"scale", "shift"}
