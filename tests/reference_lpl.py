"""A from-scratch plain-PyTorch restatement of the public reference ``LatentPerceptualLoss``
(diffusers ``examples/research_projects/lpl/lpl_loss.py``), quirks included, written for the
tests and the memory benchmark. Nothing in lpl_ext uses it.

Reproduced behaviour (docs/spec.md, "Reference defects and what lpl_ext does instead"):
- the decoder input is ``shift + z / scale`` fed straight into ``decoder.conv_in``:
  ``post_quant_conv`` is skipped;
- all prediction features are computed first (optionally checkpointing mid and up blocks),
  then all target features under no_grad; the mid output is cast to the up blocks' dtype;
- outliers (target only) on layer 2 with down factor 2 and layers 3, 4 (5) with down
  factor 1: kthvalue at ``int(L * 0.02)`` and ``int(L * 0.98)`` (k = 0 raises for L < 50),
  margin 2 * unbiased std, closing then opening by max-pooling, y = y * mask;
- stats with ``.item()`` (host syncs) before normalization;
- ``default``: both sides over their own channel norm + 1e-10; ``shared``: both over the
  target's channel norm + 1e-6; ``batch``: nothing;
- elementwise mse/l1 times the mask, summed over (h, w), times 2^-min(i, 3) with pow_law,
  divided by the mask count (0/0 = NaN on a fully masked plane), mean over channels;
  total = sum of layers / number of layers;
- ``feature_type="image"``: scalar MSE of ``vae.decode(z / scale)`` images.

``fixed_where_undefined=True`` turns the restatement into the oracle of lpl_ext's
``reference_compat=True``, which keeps the reference's arithmetic except where the
reference is undefined: the k-th value rank is clamped into [1, L] (the reference raises
for planes under 50 values) and a fully masked plane contributes 0 (the reference gives
0/0 = NaN).

Also here: ``blob_vae``, a tiny AutoencoderKL whose decoder features carry the blob
artifacts of real SD VAEs (a few large, localized activations per plane), so that the
outlier removal of layers 2, 3 and 4 really removes something.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reference import outlier_windows  # the reference's (closing, opening) per down factor


def reference_remove_outliers(
    feat: torch.Tensor, down_factor: int, *, clamp_k: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask bool, feat * mask) as the reference computes them; raises for planes < 50
    values unless ``clamp_k`` (ranks clamped into [1, L], as lpl_ext does)."""
    closing, opening = outlier_windows(down_factor)
    planes = feat.flatten(-2, -1)
    length = planes.shape[-1]
    lo_k, hi_k = int(length * 0.02), int(length * (1 - 0.02))
    if clamp_k:
        lo_k, hi_k = min(max(lo_k, 1), length), min(max(hi_k, 1), length)
    lo = planes.kthvalue(lo_k, dim=-1).values.unsqueeze(-1).unsqueeze(-1)
    hi = planes.kthvalue(hi_k, dim=-1).values.unsqueeze(-1).unsqueeze(-1)
    margin = 2 * planes.std(-1).unsqueeze(-1).unsqueeze(-1)
    mask = (lo - margin < feat) * (feat < hi + margin)
    mask = F.max_pool2d(mask.float(), closing, stride=1, padding=(closing - 1) // 2)
    mask = (-F.max_pool2d(-mask, opening, stride=1, padding=(opening - 1) // 2)).bool()
    return mask, feat * mask


def reference_layer_loss(
    x: torch.Tensor, y: torch.Tensor, index: int, *, norm_type: str, loss_type: str, pow_law: bool,
    remove_outliers: bool, fixed_where_undefined: bool = False,
) -> Tuple[torch.Tensor, Dict[str, float], torch.Tensor]:
    """One layer of the reference: (per-sample loss (N,), stats with floats, mask).
    ``fixed_where_undefined``: ranks clamped, an empty plane adds 0 (see the module doc)."""
    mask = torch.ones_like(y).bool()
    ratio = 0.0
    if remove_outliers:
        with torch.no_grad():
            if index == 2:
                mask, y = reference_remove_outliers(y, 2, clamp_k=fixed_where_undefined)
                ratio = 1.0 - mask.float().mean().item()
            elif index in (3, 4, 5):
                mask, y = reference_remove_outliers(y, 1, clamp_k=fixed_where_undefined)
                ratio = 1.0 - mask.float().mean().item()
    with torch.no_grad():
        stats = {"mean": y.mean().item(), "std": y.std().item(), "outlier_ratio": ratio}
    if norm_type == "default":
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    elif norm_type == "shared":
        denom = y.pow(2).sum(1, keepdim=True).sqrt() + 1e-6
        x, y = x / denom, y / denom
    # norm_type == "batch": the reference normalizes nothing.
    elementwise = F.mse_loss(x, y, reduction="none") if loss_type == "mse" else F.l1_loss(x, y, reduction="none")
    elementwise = elementwise * mask
    factor = 2 ** (-min(index, 3)) if pow_law else 1.0
    count = mask.sum((2, 3))
    if fixed_where_undefined:
        # clamped denominator: the 0/0 branch must not exist, or its NaN leaks into the
        # gradient through torch.where
        per_plane = elementwise.sum((2, 3)) * factor / count.clamp_min(1)
        per_plane = torch.where(count > 0, per_plane, torch.zeros_like(per_plane))
    else:
        per_plane = elementwise.sum((2, 3)) * factor / count
    return per_plane.mean((1,)), stats, mask


# The oracle's own convolution path. The oracles above and the module under test run the
# same float arithmetic; LPL_TEST_ORACLE_PATH forces the oracle onto another torch path
# than the module's, as another CPU would: "channels_last" (torch's channels-last
# convolution kernels: other blocking, other summation order), "no_mkldnn" (oneDNN off:
# the native convolutions for float32), "threads1" (one intra-op thread). Comparisons must
# hold there too (tests/tolerance.py); tests/test_oracle_paths.py runs them so.
ORACLE_PATH_ENV = "LPL_TEST_ORACLE_PATH"
ORACLE_PATHS = ("as_module", "channels_last", "no_mkldnn", "threads1")


def _oracle_path_name() -> str:
    name = os.environ.get(ORACLE_PATH_ENV, "") or "as_module"
    if name not in ORACLE_PATHS:
        raise ValueError(f"{ORACLE_PATH_ENV}={name!r}: expected one of {ORACLE_PATHS}")
    return name


@contextlib.contextmanager
def oracle_path() -> Iterator[None]:
    """Backend settings of the oracle's path (none for as_module and channels_last)."""
    name = _oracle_path_name()
    if name == "no_mkldnn":
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    elif name == "threads1":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
    else:
        yield


def oracle_layout(z: torch.Tensor) -> torch.Tensor:
    """z (N, C, H, W) in the oracle path's memory layout (channels_last, or as given)."""
    if _oracle_path_name() == "channels_last":
        return z.contiguous(memory_format=torch.channels_last)
    return z


class ReferenceLPL(nn.Module):
    """Plain-PyTorch stand-in for the reference class (same constructor)."""

    def __init__(self, vae, loss_type="mse", grad_ckpt=True, pow_law=False, norm_type="default",
                 num_mid_blocks=4, feature_type="feature", remove_outliers=True, *,
                 fixed_where_undefined=False):
        super().__init__()
        self.fixed_where_undefined = fixed_where_undefined
        assert loss_type in ("mse", "l1") and norm_type in ("default", "shared", "batch")
        assert feature_type in ("feature", "image") and 0 <= num_mid_blocks <= 4
        self.vae = vae  # a submodule, as in the reference
        self.decoder = vae.decoder
        device = next(vae.parameters()).device
        scale = getattr(vae.config, "scaling_factor", None)
        shift = getattr(vae.config, "shift_factor", None)
        self.scale = torch.tensor(1.0 if scale is None else scale, device=device)
        self.shift = torch.tensor(0.0 if shift is None else shift, device=device)
        self.gradient_checkpointing = grad_ckpt
        self.pow_law = pow_law
        self.norm_type = norm_type
        self.remove_outliers = remove_outliers
        self.feature_type = feature_type
        self.n_blocks = num_mid_blocks
        self.loss_type = loss_type
        self.last_feature_stats: List[Dict[str, float]] = []

    def get_features(self, z: torch.Tensor, disable_grads: bool = False) -> List[torch.Tensor]:
        with torch.set_grad_enabled(not disable_grads), oracle_path():
            ckpt = self.gradient_checkpointing and not disable_grads
            up_dtype = next(iter(self.decoder.up_blocks.parameters())).dtype
            h = self.decoder.conv_in(oracle_layout(z))
            blocks = [self.decoder.mid_block] + list(self.decoder.up_blocks[: self.n_blocks])
            features = []
            for i, block in enumerate(blocks):
                h = checkpoint(block, h, None, use_reentrant=False) if ckpt else block(h, None)
                if i == 0:
                    h = h.to(up_dtype)
                features.append(h)
            return features

    def layer_outputs(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> List[Tuple[torch.Tensor, Dict[str, float], torch.Tensor]]:
        """Per layer: (loss (N,), stats with floats, keep-mask bool of the layer's shape)."""
        xs = self.get_features(self.shift + input / self.scale)
        ys = self.get_features(self.shift + target / self.scale, disable_grads=True)
        return [reference_layer_loss(x, y, i, norm_type=self.norm_type, loss_type=self.loss_type,
                                     pow_law=self.pow_law, remove_outliers=self.remove_outliers,
                                     fixed_where_undefined=self.fixed_where_undefined)
                for i, (x, y) in enumerate(zip(xs, ys))]

    def get_loss(self, input: torch.Tensor, target: torch.Tensor, get_hist: bool = False):
        if self.feature_type == "image":
            with oracle_path():
                x = self.vae.decode(oracle_layout(input / self.scale)).sample
                y = self.vae.decode(oracle_layout(target / self.scale)).sample
            return F.mse_loss(x, y)
        outputs = self.layer_outputs(input, target)
        losses = [loss for loss, _, _ in outputs]
        self.last_feature_stats = [stats for _, stats, _ in outputs]
        if get_hist:
            return losses
        return sum(losses) / len(losses)


def plain_decoder_features(vae, z: torch.Tensor, num_blocks: int, *, post_quant_conv: bool = True) -> List[torch.Tensor]:
    """docs/spec.md, "Loss module", decoder input and features written out: [mid, up_0, ..., up_{K-1}] of decoder-space latents z
    (``z / scale + shift`` already applied), with post_quant_conv when asked and present."""
    dec = vae.decoder
    with oracle_path():
        z = oracle_layout(z)
        if post_quant_conv and getattr(vae, "post_quant_conv", None) is not None:
            z = vae.post_quant_conv(z)
        h = dec.mid_block(dec.conv_in(z), None)
        features = [h]
        for block in list(dec.up_blocks)[:num_blocks]:
            h = block(h, None)
            features.append(h)
    return features


# Tiny AutoencoderKL configs with 4 up blocks, so all five feature levels and all outlier
# layers exist (latent h x w -> mid h, up0 2h, up1 4h, up2 8h, up3 8h).
TINY_VAE_CONFIGS: Dict[str, dict] = {
    # SDXL-like: post_quant_conv, scaling only.
    "sdxl_like": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, latent_channels=4,
                      scaling_factor=0.13025),
    # SD3/Flux-like: 16 latent channels, shift factor, no post_quant_conv.
    "shifted": dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=8, latent_channels=16,
                    scaling_factor=1.5305, shift_factor=0.0609, use_post_quant_conv=False,
                    use_quant_conv=False),
    # Wider, two resnets per block on the decoder side.
    "wide": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, latent_channels=4,
                 scaling_factor=0.18215, layers_per_block=2),
}


def tiny_vae(name: str = "sdxl_like", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised diffusers AutoencoderKL from one of TINY_VAE_CONFIGS, in eval
    mode (built from a config: nothing is downloaded)."""
    from diffusers import AutoencoderKL

    cfg = dict(layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    cfg.update(TINY_VAE_CONFIGS[name])
    torch.manual_seed(seed)
    vae = AutoencoderKL(**cfg).eval()
    # Random init leaves many biases at 0: perturb them so every layer is exercised.
    with torch.no_grad():
        for module_name, p in vae.named_parameters():
            if module_name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return vae if dtype == torch.float32 else vae.to(dtype)


# Blob artifacts: the outputs of up blocks 1, 2 and 3 (layers 2, 3 and 4) get a few large,
# localized activations per plane, the pattern real SD VAE decoders show. In the last
# resnet of each of these blocks, one channel of conv1 is copied over its whole GroupNorm
# group, so that norm2 standardizes that channel exactly; its affine turns silu into a
# threshold detector that fires where the standardized value passes BLOB_THRESHOLD (a
# fraction of a percent of the pixels), and conv2 adds the detector, times +-BLOB_GAIN,
# to every output channel. Blocks 1 and 2 add it at one pixel (their upsampler enlarges
# it to a blob); block 3, which has no upsampler, adds it over a 3x3 box, which survives
# the closing window of 3 that layer 4's mask applies.
BLOB_THRESHOLD = 2.5
BLOB_GAIN = 3.0


def add_blob_artifacts(vae, seed: int = 0):
    """Rewrites the last resnet of decoder up blocks 1-3 in place (see above); returns vae."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in (1, 2, 3):
            res = vae.decoder.up_blocks[b].resnets[-1]
            per_group = res.conv1.weight.shape[0] // res.norm2.num_groups
            res.conv1.weight[:per_group] = res.conv1.weight[0].clone()
            res.conv1.bias[:per_group] = res.conv1.bias[0].clone()
            res.norm2.weight[0] = 8.0
            res.norm2.bias[0] = -8.0 * BLOB_THRESHOLD
            for k in range(res.conv2.weight.shape[0]):
                sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
                res.conv2.weight[k, 0] = 0.0
                if b < 3:
                    res.conv2.weight[k, 0, 1, 1] = 9.0 * sign * BLOB_GAIN
                else:
                    res.conv2.weight[k, 0] = sign * BLOB_GAIN
    return vae


def blob_vae(name: str = "sdxl_like", seed: int = 0, dtype: torch.dtype = torch.float64):
    """``tiny_vae(name, seed)`` with blob artifacts on layers 2-4, in ``dtype``.

    Its scaling and shift factors are rounded to float32: the reference holds them in
    float32 tensors, so with these values it divides float64 latents by exactly the
    numbers lpl_ext uses (the exact config values), and float64 parity is not blurred by
    the reference's rounding of the factors."""
    import numpy as np

    vae = add_blob_artifacts(tiny_vae(name, seed), seed)
    factors = {"scaling_factor": float(np.float32(vae.config.scaling_factor))}
    if vae.config.shift_factor is not None:
        factors["shift_factor"] = float(np.float32(vae.config.shift_factor))
    vae.register_to_config(**factors)
    # nn.Module.to: diffusers' own .to() warns about casting a model it did not load.
    return nn.Module.to(vae, dtype)
