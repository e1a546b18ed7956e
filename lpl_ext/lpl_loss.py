"""Drop-in ``LatentPerceptualLoss`` for diffusers VAEs (LPL_SPEC.md sections 1-4).

Constructor-compatible with the diffusers research-project class of the same name, running
on the fused kernels ``lpl_ext.feature_distance`` and ``lpl_ext.outlier_mask``, with the
reference defects of LPL_SPEC.md section 6 fixed. ``reference_compat=True`` reproduces the
reference's arithmetic wherever the reference is defined:

reproduced in compat mode
    * ``post_quant_conv`` is skipped (the reference feeds ``z / scale + shift`` straight
      into ``decoder.conv_in``);
    * ``norm_type="batch"`` normalizes nothing (it behaves like ``"none"``);
    * the mid-block output is cast to the up blocks' parameter dtype;
    * ``feature_type="image"`` returns the scalar ``mse_loss`` of ``vae.decode(z / scale)``
      (no shift, no per-sample reduction);
    * epsilons: 1e-10 for ``default``, 1e-6 for ``shared`` (the same in both modes).

kept fixed in compat mode (the reference is undefined or crashes there)
    * a fully masked (n, c) plane contributes 0 instead of 0/0 = NaN;
    * planes with fewer than 50 values (k-th value index 0) do not crash: k is clamped to
      [1, L];
    * 16-bit features are accumulated in fp32;
    * no ``.item()`` host syncs: ``last_feature_stats`` holds 0-dim tensors;
    * the VAE is not a submodule and the scale/shift are buffers.

Memory: the target and prediction decoder passes are interleaved block by block, so only
the current and previous target features are alive (the reference keeps all five), and
the per-layer loss is the fused kernel (no normalized copies kept for backward).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .feature_distance import feature_distance

from .outlier_mask import outlier_mask, outlier_windows

LOSS_TYPES = ("mse", "l1")
NORM_TYPES = ("default", "shared", "batch", "none")
FEATURE_TYPES = ("feature", "image")

# Layer index -> down factor of the reference's outlier removal (layer 5 never exists).
OUTLIER_DOWN_FACTORS: Dict[int, int] = {2: 2, 3: 1, 4: 1, 5: 1}


def _layer_weight(index: int, pow_law: bool) -> float:
    """w_i = 2^-min(i, 3) with pow_law, else 1 (spec section 4)."""
    return 2.0 ** (-min(index, 3)) if pow_law else 1.0


class LatentPerceptualLoss(nn.Module):
    """Latent Perceptual Loss on the decoder features of a diffusers ``AutoencoderKL``.

    Args (the first eight are the reference's, same order and defaults):
        vae: a diffusers ``AutoencoderKL`` (anything with ``.decoder.conv_in``,
            ``.decoder.mid_block``, ``.decoder.up_blocks`` and ``.config.scaling_factor``).
            It is held outside the module tree (not in ``parameters()``/``state_dict()``, so
            DDP and optimizers never see it) and frozen (``requires_grad_(False)``) unless
            ``freeze_vae=False``. ``.to()``/``.float()``/... on this module move it too.
        loss_type: "mse" or "l1".
        grad_ckpt: checkpoint each decoder block of the prediction pass (recomputed in
            backward); independent of any UNet flag.
        pow_law: weight layer i by 2^-min(i, 3).
        norm_type: "default", "shared" (recommended), "batch" or "none".
        num_mid_blocks: K in 0..4, the number of up-block features after the mid block.
        feature_type: "feature" (LPL) or "image" (MSE of the decoded images).
        remove_outliers: mask target outliers on layers 2 (down factor 2), 3 and 4.
        reference_compat: reproduce the reference's arithmetic (see the module docstring).
        decoder_fp32: run the decoder with autocast disabled on fp32 latents (the VAE must
            be float32); for trainers running under ``torch.autocast``.
        compute_stats: fill ``last_feature_stats`` (one extra reduction pass per layer).
        freeze_vae: call ``vae.requires_grad_(False)``.
        checkpoint_granularity: with grad_ckpt, "module" checkpoints each resnet,
            attention and upsampler of diffusers' UpDecoderBlock2D/UNetMidBlock2D (lower
            backward peak; other block types fall back to whole blocks), "block" each
            whole block as the reference does. Same values and gradients either way.

    ``get_loss(input, target)`` takes latents in diffusion space (what the UNet sees),
    (N, C_latent, h, w), and returns the per-sample loss (N,).
    """

    def __init__(
        self,
        vae: nn.Module,
        loss_type: str = "mse",
        grad_ckpt: bool = True,
        pow_law: bool = False,
        norm_type: str = "default",
        num_mid_blocks: int = 4,
        feature_type: str = "feature",
        remove_outliers: bool = True,
        *,
        reference_compat: bool = False,
        decoder_fp32: bool = False,
        compute_stats: bool = True,
        freeze_vae: bool = True,
        checkpoint_granularity: str = "module",
    ) -> None:
        super().__init__()
        decoder = getattr(vae, "decoder", None)
        if decoder is None or not all(hasattr(decoder, a) for a in ("conv_in", "mid_block", "up_blocks")):
            raise TypeError("vae: expected a diffusers AutoencoderKL-like model with decoder.conv_in, "
                            f"decoder.mid_block and decoder.up_blocks, got {type(vae).__name__}")
        if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
        if not isinstance(norm_type, str) or norm_type.lower() not in NORM_TYPES:
            raise ValueError(f"norm_type: expected one of {NORM_TYPES}, got {norm_type!r}")
        if isinstance(num_mid_blocks, bool) or not isinstance(num_mid_blocks, int) or not 0 <= num_mid_blocks <= 4:
            raise ValueError(f"num_mid_blocks: expected an int in 0..4, got {num_mid_blocks!r}")
        if feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type: expected one of {FEATURE_TYPES}, got {feature_type!r}")

        # Held outside the module tree: DDP, optimizers and state_dict never see the VAE.
        object.__setattr__(self, "_vae", vae)
        if freeze_vae:
            vae.requires_grad_(False)

        config = getattr(vae, "config", None)
        scale = getattr(config, "scaling_factor", None)
        shift = getattr(config, "shift_factor", None)
        device = next(iter(vae.parameters())).device
        self._scale_value = 1.0 if scale is None else float(scale)
        self._shift_value = 0.0 if shift is None else float(shift)
        # Buffers, so .to(device) moves them (the reference's plain tensors stay behind).
        # float64 keeps the config values exact; a 0-dim tensor never changes the dtype of
        # the latents it divides.
        self.register_buffer("scale", torch.tensor(self._scale_value, dtype=torch.float64, device=device),
                             persistent=False)
        self.register_buffer("shift", torch.tensor(self._shift_value, dtype=torch.float64, device=device),
                             persistent=False)

        self.loss_type = loss_type
        if checkpoint_granularity not in ("block", "module"):
            raise ValueError(f"checkpoint_granularity: expected 'block' or 'module', got {checkpoint_granularity!r}")
        self.gradient_checkpointing = bool(grad_ckpt)
        self.checkpoint_granularity = checkpoint_granularity
        self.pow_law = bool(pow_law)
        self.norm_type = norm_type.lower()
        self.n_blocks = num_mid_blocks
        self.feature_type = feature_type
        self.outlier_mask = bool(remove_outliers)
        self.reference_compat = bool(reference_compat)
        self.decoder_fp32 = bool(decoder_fp32)
        self.compute_stats = bool(compute_stats)
        self.last_feature_stats: List[Dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ VAE handling
    @property
    def vae(self) -> nn.Module:
        """The wrapped VAE (not a submodule)."""
        return self._vae

    @property
    def decoder(self) -> nn.Module:
        return self._vae.decoder

    @property
    def num_layers(self) -> int:
        """Number of feature layers: the mid block plus min(K, len(up_blocks))."""
        return 1 + min(self.n_blocks, len(self.decoder.up_blocks))

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # Moving/casting the loss moves its VAE as well, as if it were a submodule.
        super()._apply(fn, *args, **kwargs)
        self._vae._apply(fn, *args, **kwargs)
        # Follow device moves only: a dtype cast must not round the scale and shift.
        self.scale = torch.tensor(self._scale_value, dtype=torch.float64, device=self.scale.device)
        self.shift = torch.tensor(self._shift_value, dtype=torch.float64, device=self.shift.device)
        return self

    def _decoder_dtype(self) -> torch.dtype:
        return next(iter(self.decoder.parameters())).dtype

    def _autocast_context(self, device: torch.device):
        if self.decoder_fp32:
            return torch.autocast(device_type=device.type, enabled=False)
        return contextlib.nullcontext()

    def _prepare_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents -> decoder input (before post_quant_conv)."""
        if self.decoder_fp32:
            if self._decoder_dtype() != torch.float32:
                raise ValueError("decoder_fp32: needs a float32 VAE, got parameters of dtype "
                                 f"{self._decoder_dtype()}")
            z = z.float()
        elif not torch.is_autocast_enabled(z.device.type):
            # Without autocast the convolutions need the VAE's dtype.
            z = z.to(self._decoder_dtype())
        if self.reference_compat:
            return self.shift + z / self.scale
        return z / self.scale + self.shift

    def _decoder_stem(self, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv (skipped in compat mode, as the reference does) and conv_in."""
        pqc = getattr(self._vae, "post_quant_conv", None)
        if pqc is not None and not self.reference_compat:
            z = pqc(z)
        return self.decoder.conv_in(z)

    def _blocks(self, all_up_blocks: bool = False) -> List[nn.Module]:
        up = list(self.decoder.up_blocks)
        return [self.decoder.mid_block] + (up if all_up_blocks else up[: self.n_blocks])

    @staticmethod
    def _block_steps(block: nn.Module) -> Optional[List[Callable[[torch.Tensor], torch.Tensor]]]:
        """The sub-module sequence of a diffusers UpDecoderBlock2D / UNetMidBlock2D (the same
        calls as their forward with temb=None), or None for any other block."""
        kind = type(block).__name__
        if kind == "UpDecoderBlock2D" and type(block).forward.__qualname__ == "UpDecoderBlock2D.forward":
            steps = [functools.partial(r, temb=None) for r in block.resnets]
            steps += list(block.upsamplers or [])
            return steps
        if kind == "UNetMidBlock2D" and type(block).forward.__qualname__ == "UNetMidBlock2D.forward":
            steps = [functools.partial(block.resnets[0], temb=None)]
            for attn, resnet in zip(block.attentions, block.resnets[1:]):
                if attn is not None:
                    steps.append(functools.partial(attn, temb=None))
                steps.append(functools.partial(resnet, temb=None))
            return steps
        return None

    def _run_block(self, index: int, block: nn.Module, h: torch.Tensor, use_ckpt: bool) -> torch.Tensor:
        steps = self._block_steps(block) if (use_ckpt and self.checkpoint_granularity == "module") else None
        if steps is not None:
            # One checkpoint per resnet/attention/upsampler: backward recomputes one module
            # at a time instead of a whole block (the saved activations of the three
            # resnets of SDXL's last up block are ~5x its output size each).
            out = h
            for step in steps:
                out = checkpoint(step, out, use_reentrant=False)
        elif use_ckpt:
            out = checkpoint(block, h, None, use_reentrant=False)
        else:
            out = block(h, None)
        if index == 0 and self.reference_compat:
            # The reference casts the mid-block output to the up blocks' dtype (a leftover
            # of an old diffusers Decoder); current diffusers does not.
            out = out.to(next(iter(self.decoder.up_blocks.parameters())).dtype)
        return out

    # ------------------------------------------------------------------ features
    def get_features(
        self, z: torch.Tensor, latent_embeds: Optional[torch.Tensor] = None, disable_grads: bool = False
    ) -> List[torch.Tensor]:
        """Decoder features of decoder-space latents z (N, C_latent, h, w): [mid, up_0, ...,
        up_{K-1}] (reference signature; ``z`` is already ``z / scale + shift``).
        post_quant_conv is applied unless reference_compat."""
        if latent_embeds is not None:
            raise ValueError("latent_embeds: spatially conditioned decoders are not supported")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not disable_grads), \
                self._autocast_context(z.device):
            use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
            if self.decoder_fp32:
                z = z.float()
            h = self._decoder_stem(z)
            features = []
            for i, block in enumerate(self._blocks()):
                h = self._run_block(i, block, h, use_ckpt)
                features.append(h)
            return features

    def _mask_and_stats(
        self, index: int, y: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
        """Keep-mask (bool, y's shape) of layer ``index`` or None, and its logging stats."""
        keep = None
        stats = None
        with torch.no_grad():
            if self.outlier_mask and index in OUTLIER_DOWN_FACTORS:
                closing, opening = outlier_windows(OUTLIER_DOWN_FACTORS[index])
                if self.compute_stats:
                    keep, raw = outlier_mask(y, closing=closing, opening=opening, return_stats=True)
                    # 0-dim float64 tensors on y's device: mean, std of y * keep, 1 - mean(keep)
                    stats = {"mean": raw.mean.float(), "std": raw.std.float(),
                             "outlier_ratio": raw.outlier_ratio.float()}
                else:
                    keep = outlier_mask(y, closing=closing, opening=opening)
            if self.compute_stats and keep is None:  # unmasked layer: plain statistics
                std, mean = torch.std_mean(y)
                stats = {"mean": mean.float(), "std": std.float(),
                         "outlier_ratio": torch.zeros((), dtype=torch.float32, device=y.device)}
        return keep, stats

    # ------------------------------------------------------------------ loss
    def _check_pair(self, input: Any, target: Any) -> None:
        for name, t in (("input", input), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name}: expected (N, C, h, w) latents, got shape {tuple(t.shape)}")
        if input.shape != target.shape:
            raise ValueError(f"target: shape {tuple(target.shape)} differs from input {tuple(input.shape)}")
        if input.device != target.device:
            raise ValueError(f"target: on {target.device}, input on {input.device}")

    def layer_losses(self, input: torch.Tensor, target: torch.Tensor) -> List[torch.Tensor]:
        """Per-layer per-sample losses [(N,)] * num_layers (``get_loss(..., get_hist=True)``).

        The target and prediction passes are interleaved block by block: each target
        feature is freed as soon as its layer loss is computed."""
        self._check_pair(input, target)
        distance_norm = "none" if (self.reference_compat and self.norm_type == "batch") else self.norm_type
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        losses: List[torch.Tensor] = []
        stats_list: List[Dict[str, torch.Tensor]] = []
        with self._autocast_context(input.device):
            with torch.no_grad():
                hy = self._decoder_stem(self._prepare_latents(target))
            hx = self._decoder_stem(self._prepare_latents(input))
            for i, block in enumerate(self._blocks()):
                with torch.no_grad():
                    hy = self._run_block(i, block, hy, False)
                hx = self._run_block(i, block, hx, use_ckpt)
                keep, stats = self._mask_and_stats(i, hy)
                if stats is not None:
                    stats_list.append(stats)
                loss = feature_distance(hx, hy.detach(), keep, norm=distance_norm, distance=self.loss_type,
                                        weight=_layer_weight(i, self.pow_law))
                if not self.reference_compat and loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()
                losses.append(loss)
        self.last_feature_stats = stats_list
        return losses

    def _image_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.reference_compat:
            # Reference: whole-image decode of z / scale (no shift), scalar mean.
            x = self._vae.decode(input / self.scale).sample
            with torch.no_grad():
                y = self._vae.decode(target / self.scale).sample
            return F.mse_loss(x, y)
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        dec = self.decoder

        def decode(z: torch.Tensor, ckpt: bool) -> torch.Tensor:
            h = self._decoder_stem(self._prepare_latents(z))
            for i, block in enumerate(self._blocks(all_up_blocks=True)):
                h = self._run_block(i, block, h, ckpt)
            return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

        with self._autocast_context(input.device):
            with torch.no_grad():
                y = decode(target, False)
            x = decode(input, use_ckpt)
        diff = x.float() - y.float()
        return (diff * diff).mean(dim=(1, 2, 3))

    def get_loss(
        self, input: torch.Tensor, target: torch.Tensor, get_hist: bool = False
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """LPL between predicted latents ``input`` and clean latents ``target``.

        Args:
            input: (N, C_latent, h, w) predicted latents in diffusion space; gradients flow
                back to it.
            target: same shape; constant (no graph is built for it).
            get_hist: return the list of per-layer (N,) losses instead of their mean.
        Returns:
            (N,) per-sample loss (float32 for 16-bit features outside compat mode), or the
            list of per-layer (N,) losses. feature_type="image": (N,) per-sample image MSE
            (compat: the reference's scalar).
        """
        if self.feature_type == "image":
            self._check_pair(input, target)
            loss = self._image_loss(input, target)
            return [loss] if (get_hist and not self.reference_compat) else loss
        losses = self.layer_losses(input, target)
        if get_hist:
            return losses
        return sum(losses) / len(losses)

    def forward(self, input: torch.Tensor, target: torch.Tensor, get_hist: bool = False):
        """Same as :meth:`get_loss`."""
        return self.get_loss(input, target, get_hist=get_hist)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, norm_type={self.norm_type!r}, num_mid_blocks={self.n_blocks}, "
                f"pow_law={self.pow_law}, remove_outliers={self.outlier_mask}, grad_ckpt="
                f"{self.gradient_checkpointing}, reference_compat={self.reference_compat}, "
                f"decoder_fp32={self.decoder_fp32}")
