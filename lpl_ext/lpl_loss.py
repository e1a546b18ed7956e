"""Drop-in ``LatentPerceptualLoss`` for diffusers VAEs (docs/spec.md, "Loss module").

Constructor-compatible with the diffusers research-project class of the same name
(``examples/research_projects/lpl/lpl_loss.py``), running on the fused kernels
``lpl_ext.feature_distance`` and ``lpl_ext.outlier_mask``, with the reference's defects
fixed (docs/spec.md, "Reference defects and what lpl_ext does instead"). The reference
module's other public names are here too, with
its semantics: the functions ``normalize_tensor``, ``cross_normalize`` and
``remove_outliers``, and the members ``loss_fn``, ``get_features(z, latent_embeds,
disable_grads)``, ``get_first_conv``, ``get_first_block`` and ``get_first_layer``.
``reference_compat=True`` reproduces the reference's arithmetic wherever the reference is
defined:

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
    * no ``.item()`` host syncs per layer: ``last_feature_stats`` is filled with plain
      floats on first access, by one batched device-to-host copy (none if nobody reads
      it); ``last_feature_stats_tensors`` holds the same values as 0-dim device tensors;
    * the VAE is not a submodule and the scale/shift are buffers;
    * the VAE is used as given: nothing of it is mutated (its ``requires_grad`` flags
      included). With ``freeze_vae=True`` (default) the loss never produces gradients
      for its parameters: the decoder runs on detached views of any parameter that
      requires grad, so the gradient reaches the input latents only.

torch.compile: ``get_loss`` (and a training step around it) compiles with
``fullgraph=True``: the kernels are PyTorch operators (``lpl_ext._ops``) and the options
are validated as Python values before anything is traced.

Memory: the target and prediction decoder passes are interleaved block by block, so only
the current and previous target features are alive (the reference keeps all five), and
the per-layer loss is the fused kernel (no normalized copies kept for backward).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._launch import plane_moments_pay_off
from ._torch_backend import wide_dtype
from .config import FEATURE_TYPES, LPLConfig, fields_of
from .feature_distance import DISTANCES, NORMS, feature_distance, weighted_feature_distance
from .outlier_mask import outlier_mask, outlier_windows, reference_windows

try:  # torch >= 2.0
    from torch.func import functional_call as _functional_call
except ImportError:  # pragma: no cover
    from torch.nn.utils.stateless import functional_call as _functional_call

LOSS_TYPES = DISTANCES  # the reference's names for the kernel's options (FEATURE_TYPES: from .config)
NORM_TYPES = NORMS

#: The drop-in's names of the loss options, the one place they are mapped: LPLConfig field
#: -> (constructor argument, attribute). The first seven are the reference's (its
#: attributes n_blocks, outlier_mask, gradient_checkpointing); lpl_ext's own options keep
#: their field names. Each attribute reads ``self.config``, and assigning it replaces the
#: config (validated). ``reference_compat`` has no such attribute: ``self.reference_compat``
#: is the resolved value (LPL_EXT_REFERENCE_COMPAT decides where the option is None).
REFERENCE_NAMES: Dict[str, Tuple[str, Optional[str]]] = {
    "loss_type": ("loss_type", "loss_type"),
    "grad_ckpt": ("grad_ckpt", "gradient_checkpointing"),
    "pow_law": ("pow_law", "pow_law"),
    "norm_type": ("norm_type", "norm_type"),
    "num_blocks": ("num_mid_blocks", "n_blocks"),
    "feature_type": ("feature_type", "feature_type"),
    "remove_outliers": ("remove_outliers", "outlier_mask"),
    "reference_compat": ("reference_compat", None),
    "decoder_fp32": ("decoder_fp32", "decoder_fp32"),
    "compute_stats": ("compute_stats", "compute_stats"),
    "freeze_vae": ("freeze_vae", "freeze_vae"),
    "checkpoint_granularity": ("checkpoint_granularity", "checkpoint_granularity"),
}
if set(REFERENCE_NAMES) != set(fields_of("loss")):
    raise ImportError(f"lpl_ext.lpl_loss.REFERENCE_NAMES must name every loss option of LPLConfig: "
                      f"{sorted(set(fields_of('loss')) ^ set(REFERENCE_NAMES))}")
_ARGUMENT_NAMES = {field: names[0] for field, names in REFERENCE_NAMES.items()}
_ATTRIBUTE_NAMES = {attribute: field for field, (_, attribute) in REFERENCE_NAMES.items() if attribute}

# Layer index -> down factor of the reference's outlier removal (layer 5 never exists).
OUTLIER_DOWN_FACTORS: Dict[int, int] = {2: 2, 3: 1, 4: 1, 5: 1}


logger = logging.getLogger(__name__)

# docs/switching.md, "Reproducing the reference from an unchanged script".
REFERENCE_COMPAT_ENV = "LPL_EXT_REFERENCE_COMPAT"
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
_notice_logged = False  # the arithmetic notice is logged once per process


def _reference_compat_from_env() -> Optional[bool]:
    """``LPL_EXT_REFERENCE_COMPAT`` as a bool, None when unset or empty; ValueError
    naming the variable for anything else than 1/true/yes/on or 0/false/no/off."""
    raw = os.environ.get(REFERENCE_COMPAT_ENV, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ValueError(f"{REFERENCE_COMPAT_ENV}: expected 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def _log_reference_notice(differences: List[str]) -> None:
    """The one-time notice that the loss is not the reference's (docs/switching.md)."""
    global _notice_logged
    if _notice_logged:
        return
    _notice_logged = True
    logger.warning(
        "lpl_ext.LatentPerceptualLoss does not compute the diffusers reference's loss: it %s. At the "
        "same flags the loss and its gradient differ from the reference's (by 0.24-1.5x in the loss on "
        "the VAEs measured so far), so an lpl_weight tuned with the reference means something else "
        "here; see 'Loss scale against the reference' (docs/training.md, linked from the README) and "
        "docs/switching.md. Two ways to keep such a weight: (1) reproduce the reference's arithmetic "
        "with reference_compat=True, or %s=1 in the environment of an unchanged script; (2) keep "
        "lpl_ext's arithmetic and divide the old weight by the lpl_ext / reference loss ratio measured "
        "on your VAE (benchmarks/run_all.py --only loss_scale). Passing reference_compat explicitly, "
        "or %s=0, silences this notice (logged once per process).",
        "; ".join(differences), REFERENCE_COMPAT_ENV, REFERENCE_COMPAT_ENV)


def _layer_weight(index: int, pow_law: bool) -> float:
    """w_i = 2^-min(i, 3) with pow_law, else 1 (docs/spec.md, "Feature distance")."""
    return 2.0 ** (-min(index, 3)) if pow_law else 1.0


# ---------------------------------------------------------------------- reference functions
# The module-level helpers of the public reference's lpl_loss.py, same signatures and
# semantics, so code that imports them from there keeps working with lpl_ext.

def normalize_tensor(in_feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``in_feat / (||in_feat||_channels + eps)``: each pixel column divided by its L2 norm
    over dim 1 (channels), as the reference's ``normalize_tensor``. Any shape with a dim 1;
    same dtype as ``in_feat`` (computed in that dtype, as the reference does)."""
    if not isinstance(in_feat, torch.Tensor):
        raise TypeError(f"in_feat: expected a torch.Tensor, got {type(in_feat).__name__}")
    norm_factor = torch.sqrt(torch.sum(in_feat ** 2, dim=1, keepdim=True))
    return in_feat / (norm_factor + eps)


def cross_normalize(
    input: torch.Tensor, target: torch.Tensor, eps: float = 1e-10
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input / d, target / d)`` with ``d = ||target||_channels + eps`` (the target's L2
    norm over dim 1), as the reference's ``cross_normalize``. Shapes broadcast like
    ``input / d``; gradients flow to both (as in the reference)."""
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    norm_factor = torch.sqrt(torch.sum(target ** 2, dim=1, keepdim=True))
    return input / (norm_factor + eps), target / (norm_factor + eps)


def remove_outliers(
    feat: torch.Tensor, down_f: int = 1, opening: int = 5, closing: int = 3, m: float = 100,
    quant: float = 0.02,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``remove_outliers``: ``(mask, feat * mask)``.

    Per (n, c) plane of ``feat`` (N, C, H, W) (or (C, H, W)): keep values strictly inside
    ``(q1 - 2 std, q2 + 2 std)`` with q1 / q2 the ``int(L * quant)``-th /
    ``int(L * (1 - quant))``-th smallest value and std the unbiased plane std, then a
    closing (max filter of ``ceil(closing / down_f)``) and an opening (min filter of
    ``ceil(opening / down_f)``); a window of 2 becomes 3 (opening) or 1 (closing), as in
    the reference. ``m`` is accepted and ignored, as in the reference (the margin is
    always 2 std). Runs on the fused ``lpl_ext.outlier_mask`` kernel: same mask as the
    reference for finite features with at least 50 values per plane, and defined where
    the reference is not (fewer than 50 values: order statistic clamped to 1 instead of
    a ``kthvalue(0)`` crash; NaN / Inf are never kept).

    Returns:
        mask: bool, ``feat``'s shape; feat * mask: ``feat``'s dtype, differentiable with
        respect to ``feat`` (the mask is a constant).
    """
    if not isinstance(feat, torch.Tensor):
        raise TypeError(f"feat: expected a torch.Tensor, got {type(feat).__name__}")
    if feat.dim() not in (3, 4):
        raise ValueError(f"feat: expected (N, C, H, W) or (C, H, W) features, got shape {tuple(feat.shape)}")
    for name, v in (("down_f", down_f), ("opening", opening), ("closing", closing)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
            raise ValueError(f"{name}: expected a positive number, got {v!r}")
    closing, opening = reference_windows(down_f, closing=closing, opening=opening)
    y = feat.detach()
    mask = outlier_mask(y if y.dim() == 4 else y.unsqueeze(0), quantile=quant, margin_std=2.0,
                        closing=closing, opening=opening)
    if feat.dim() == 3:
        mask = mask.squeeze(0)
    return mask, feat * mask


def _stats_to_floats(stats: List[Dict[str, torch.Tensor]]) -> List[Dict[str, float]]:
    """0-dim tensors -> Python floats with one device-to-host copy for all of them."""
    if not stats:
        return []
    keys = [list(layer) for layer in stats]
    # float32 on the device (as stored; a device may lack float64), exact as Python floats
    flat = torch.stack([layer[k].detach().reshape(()).float() for layer, ks in zip(stats, keys) for k in ks])
    values = iter(flat.cpu().tolist())  # the one sync (a no-op copy on CPU)
    return [{k: next(values) for k in ks} for ks in keys]


class LatentPerceptualLoss(nn.Module):
    """Latent Perceptual Loss on the decoder features of a diffusers ``AutoencoderKL``.

    Args (the first eight are the reference's, same order and defaults):
        vae: a diffusers ``AutoencoderKL`` (anything with ``.decoder.conv_in``,
            ``.decoder.mid_block``, ``.decoder.up_blocks`` and ``.config.scaling_factor``).
            It is held outside the module tree (not in ``parameters()``/``state_dict()``, so
            DDP and optimizers never see it) and never mutated (``requires_grad`` flags
            included). ``.to()``/``.float()``/... on this module move it too.
            ``lpl_fn.vae = other_vae`` rebinds the loss to ``other_vae`` (its decoder,
            scale, shift and device); it never becomes a submodule.
        loss_type: "mse" or "l1".
        grad_ckpt: checkpoint each decoder block of the prediction pass (recomputed in
            backward); independent of any UNet flag.
        pow_law: weight layer i by 2^-min(i, 3).
        norm_type: "default", "shared" (recommended), "batch" or "none".
        num_mid_blocks: K in 0..4, the number of up-block features after the mid block.
        feature_type: "feature" (LPL) or "image" (MSE of the decoded images).
        remove_outliers: mask target outliers on layers 2 (down factor 2), 3 and 4.
        reference_compat: reproduce the reference's arithmetic (see the module docstring).
            Not given (None): ``LPL_EXT_REFERENCE_COMPAT=1`` in the environment turns it
            on, so that an unchanged script can reproduce the reference; otherwise off,
            and a one-time notice is logged (``logging``, WARNING) that the loss differs
            from the reference's. An explicit value wins over the environment and
            silences the notice, as does ``LPL_EXT_REFERENCE_COMPAT=0``.
        decoder_fp32: run the decoder with autocast disabled on fp32 latents (the VAE must
            be float32); for trainers running under ``torch.autocast``.
        compute_stats: fill ``last_feature_stats`` (one extra reduction pass per layer).
        freeze_vae: never produce gradients for the VAE's parameters (default): the
            decoder runs on detached views of those that require grad (the caller's flags
            stay as they are). False: they get gradients wherever they require grad, as
            with the reference.
        checkpoint_granularity: with grad_ckpt, "module" checkpoints each resnet,
            attention and upsampler of diffusers' UpDecoderBlock2D/UNetMidBlock2D (lower
            backward peak; other block types fall back to whole blocks), "block" each
            whole block as the reference does. Same values and gradients either way.

    Configuration: the arguments are validated once, as an :class:`lpl_ext.LPLConfig`
    (``config``; errors name the argument as spelled here). :data:`REFERENCE_NAMES` maps
    the argument names, and the reference's attributes (``n_blocks``, ``outlier_mask``,
    ``gradient_checkpointing``, ``loss_type``, ...), onto its fields; assigning such an
    attribute replaces the config. ``LatentPerceptualLoss.from_config(vae, config)``
    builds the loss from a config.

    ``get_loss(input, target)`` takes latents in diffusion space (what the UNet sees),
    (N, C_latent, h, w), and returns the per-sample loss (N,).

    ``last_feature_stats``: after a ``get_loss``, one dict per layer with the plain floats
    ``mean``, ``std`` and ``outlier_ratio`` of the (masked) target features, as the
    reference has them (JSON- and tracker-friendly). They are converted on first access
    with one device-to-host copy for all layers; nothing is copied if nobody reads them.
    ``last_feature_stats_tensors`` has the same values as 0-dim float32 device tensors
    (no sync at all).

    State: ``parameters()`` is empty and ``state_dict()`` is empty (the reference's
    holds the VAE, under ``vae.`` and ``decoder.``: 180 parameters and 284 keys for a
    tiny 4-block AutoencoderKL). The VAE stays outside the module tree so that
    DDP/FSDP and optimizers wrapping a model that contains this loss never see (or
    all-reduce, or save) a frozen VAE; its weights belong to the VAE. The only tensors are the non-persistent
    buffers ``scale`` and ``shift`` (float64, float32 on a device without float64 such
    as MPS). Loading a reference-era ``state_dict`` (keys under ``vae.``/``decoder.``)
    raises a RuntimeError that says so and how to load those weights into the VAE,
    with ``strict=False`` too: silently dropping them would look like a restored VAE.
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
        reference_compat: Optional[bool] = None,
        decoder_fp32: bool = False,
        compute_stats: bool = True,
        freeze_vae: bool = True,
        checkpoint_granularity: str = "module",
    ) -> None:
        arguments = dict(locals())  # the constructor's arguments by name, nothing else yet
        super().__init__()
        config = LPLConfig.named(_ARGUMENT_NAMES, **{f: arguments[a] for f, a in _ARGUMENT_NAMES.items()})
        from_env = _reference_compat_from_env()
        self._bind_vae(vae)
        self.config = config
        # The resolved value (the config keeps None: "not given", the environment decides).
        self.reference_compat = config.reference_compat if config.reference_compat is not None else bool(from_env)
        self._stats_tensors: List[Dict[str, torch.Tensor]] = []
        self._stats_floats: Optional[List[Dict[str, float]]] = []
        if reference_compat is None and from_env is None:
            differences = self.reference_differences()
            if differences:
                _log_reference_notice(differences)

    def reference_differences(self) -> List[str]:
        """What this configuration computes differently from the diffusers reference, in
        words (empty in compat mode and where the two coincide; docs/spec.md, "Reference
        defects and what lpl_ext does instead", lists the fixes kept in both modes)."""
        if self.reference_compat:
            return []
        differences = []
        pqc = getattr(self._vae, "post_quant_conv", None)
        if self.config.feature_type == "feature":
            if pqc is not None:
                differences.append("applies the VAE's post_quant_conv before the decoder (the reference skips it)")
            if self.config.norm_type == "batch":
                differences.append("standardizes each channel for norm_type='batch' (the reference normalizes "
                                   "nothing)")
            mid = next(iter(self.decoder.mid_block.parameters()), None)
            up = next(iter(self.decoder.up_blocks.parameters()), None)
            if mid is not None and up is not None and mid.dtype != up.dtype:
                differences.append("keeps the mid-block output in its dtype (the reference casts it to the up "
                                   "blocks' dtype)")
        else:
            differences.append("returns the per-sample (N,) MSE of images decoded from z / scale + shift "
                               "(the reference: a scalar, from z / scale)")
        return differences

    # ------------------------------------------------------------------ logging statistics
    @property
    def last_feature_stats(self) -> List[Dict[str, float]]:
        """Per-layer ``{"mean", "std", "outlier_ratio"}`` of the last ``get_loss`` as Python
        floats; the first access after a call costs one batched device-to-host copy."""
        if self._stats_floats is None:
            self._stats_floats = _stats_to_floats(self._stats_tensors)
        return self._stats_floats

    @last_feature_stats.setter
    def last_feature_stats(self, value: List[Dict[str, Any]]) -> None:
        # Code written against the reference resets it with ``= []``.
        self._stats_tensors = []
        self._stats_floats = value

    @property
    def last_feature_stats_tensors(self) -> List[Dict[str, torch.Tensor]]:
        """The statistics of the last ``get_loss`` as 0-dim float32 tensors on the latents'
        device (no host sync; what ``LPLObjective`` logs)."""
        return self._stats_tensors

    def _set_stats(self, stats: List[Dict[str, torch.Tensor]]) -> None:
        self._stats_tensors = stats
        self._stats_floats = None  # converted on first read

    # ------------------------------------------------------------------ VAE handling
    @property
    def vae(self) -> nn.Module:
        """The wrapped VAE (not a submodule); assigning another one rebinds the loss."""
        return self._vae

    def _bind_vae(self, vae: Any) -> None:
        """Use ``vae`` from now on: its decoder, its config's scale and shift (buffers on
        its device). Never registers it as a submodule."""
        decoder = getattr(vae, "decoder", None)
        if (not isinstance(vae, nn.Module) or decoder is None
                or not all(hasattr(decoder, a) for a in ("conv_in", "mid_block", "up_blocks"))):
            raise TypeError("vae: expected a diffusers AutoencoderKL-like model with decoder.conv_in, "
                            f"decoder.mid_block and decoder.up_blocks, got {type(vae).__name__}")
        config = getattr(vae, "config", None)
        scale = getattr(config, "scaling_factor", None)
        shift = getattr(config, "shift_factor", None)
        first = next(iter(vae.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        # Held outside the module tree: DDP, optimizers and state_dict never see the VAE.
        # Nothing of the caller's VAE is mutated: freezing is done per call (_call).
        object.__setattr__(self, "_vae", vae)
        self._scale_value = 1.0 if scale is None else float(scale)
        self._shift_value = 0.0 if shift is None else float(shift)
        # Buffers, so .to(device) moves them (the reference's plain tensors stay behind).
        # float64 keeps the config values exact (float32 where the device has no float64);
        # a 0-dim tensor never changes the dtype of the latents it divides.
        for name, value in (("scale", self._scale_value), ("shift", self._shift_value)):
            self.register_buffer(name, self._config_tensor(value, device), persistent=False)

    @staticmethod
    def _config_tensor(value: float, device: torch.device) -> torch.Tensor:
        return torch.tensor(value, dtype=wide_dtype(device), device=device)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ would register an assigned VAE as a submodule, shadowed
        # by the ``vae`` property: the loss would keep the old VAE and gain parameters.
        if name == "vae":
            self._bind_vae(value)
        elif name == "decoder":
            raise AttributeError("decoder: follows the VAE; assign lpl_fn.vae = new_vae to change it")
        else:
            super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[override]
                              unexpected_keys, error_msgs) -> None:
        vae_keys = [k for k in state_dict if k.startswith((prefix + "vae.", prefix + "decoder."))]
        if vae_keys:
            # Raised with strict=False too: dropping the VAE's weights silently would look
            # like a restored VAE.
            error_msgs.append(
                f"{len(vae_keys)} keys such as {vae_keys[0]!r} hold VAE weights: this is a state_dict of the "
                "diffusers reference's LatentPerceptualLoss, whose VAE is a submodule. lpl_ext's "
                "LatentPerceptualLoss has no state (its VAE stays outside the module tree, see "
                "docs/switching.md), so they cannot be loaded through it, with strict=False either. Load "
                "them into the VAE itself, e.g. vae.load_state_dict({k[len('vae.'):]: v for k, v in "
                "state_dict.items() if k.startswith('vae.')}), and drop the 'vae.'/'decoder.' keys from what "
                "you load into the loss.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def decoder(self) -> nn.Module:
        return self._vae.decoder

    @property
    def num_layers(self) -> int:
        """Number of feature layers: the mid block plus min(K, len(up_blocks))."""
        return 1 + min(self.config.num_blocks, len(self.decoder.up_blocks))

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # Moving/casting the loss moves its VAE as well, as if it were a submodule.
        # scale/shift are rebuilt from the config values below; fn gets float32 stand-ins,
        # which every device holds (a float64 tensor cannot move to MPS).
        for name in ("scale", "shift"):
            self._buffers[name] = self._buffers[name].float()
        super()._apply(fn, *args, **kwargs)
        self._vae._apply(fn, *args, **kwargs)
        # Follow device moves only: a dtype cast must not round the scale and shift.
        self.scale = self._config_tensor(self._scale_value, self.scale.device)
        self.shift = self._config_tensor(self._shift_value, self.shift.device)
        return self

    def _decoder_dtype(self) -> torch.dtype:
        return next(iter(self.decoder.parameters())).dtype

    def _autocast_context(self, device: torch.device):
        if self.config.decoder_fp32:
            return torch.autocast(device_type=device.type, enabled=False)
        return contextlib.nullcontext()

    def _prepare_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents -> decoder input (before post_quant_conv)."""
        if self.config.decoder_fp32:
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

    def _call(self, module: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)``; with ``freeze_vae`` and grad enabled, on detached
        views of the module's parameters that require grad, so that autograd records no
        edge to them (the input still gets its gradient) and the caller's VAE is left as
        given. ``module`` may be a ``functools.partial`` of a module (bound kwargs)."""
        if isinstance(module, functools.partial):
            kwargs = {**module.keywords, **kwargs}
            args = module.args + args
            module = module.func
        if self.config.freeze_vae and torch.is_grad_enabled() and isinstance(module, nn.Module):
            detached = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
            if detached:
                return _functional_call(module, detached, args, kwargs)
        return module(*args, **kwargs)

    def _decoder_stem(self, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv (skipped in compat mode, as the reference does) and conv_in."""
        pqc = getattr(self._vae, "post_quant_conv", None)
        if pqc is not None and not self.reference_compat:
            z = self._call(pqc, z)
        return self._call(self.decoder.conv_in, z)

    def _blocks(self, all_up_blocks: bool = False) -> List[nn.Module]:
        up = list(self.decoder.up_blocks)
        return [self.decoder.mid_block] + (up if all_up_blocks else up[: self.config.num_blocks])

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

    def _run_block(
        self, index: int, block: nn.Module, h: torch.Tensor, use_ckpt: bool,
        temb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        steps = None
        if use_ckpt and self.config.checkpoint_granularity == "module" and temb is None:
            steps = self._block_steps(block)
        # Checkpointed functions go through _call too, so that the recomputation in
        # backward sees the same detached parameters as the forward.
        if steps is not None:
            # One checkpoint per resnet/attention/upsampler: backward recomputes one module
            # at a time instead of a whole block (the saved activations of the three
            # resnets of SDXL's last up block are ~5x its output size each).
            out = h
            for step in steps:
                out = checkpoint(self._call, step, out, use_reentrant=False)
        elif use_ckpt:
            out = checkpoint(self._call, block, h, temb, use_reentrant=False)
        else:
            out = self._call(block, h, temb)
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

        post_quant_conv is applied unless reference_compat. ``latent_embeds`` is handed to
        the mid and up blocks as their second argument (``temb``), as the reference does
        (spatially conditioned decoders use it; diffusers' default blocks add it to their
        hidden states when given). ``disable_grads`` builds no graph."""
        if latent_embeds is not None and not isinstance(latent_embeds, torch.Tensor):
            raise TypeError(f"latent_embeds: expected a torch.Tensor or None, got {type(latent_embeds).__name__}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not disable_grads), \
                self._autocast_context(z.device):
            use_ckpt = self.config.grad_ckpt and torch.is_grad_enabled()
            if self.config.decoder_fp32:
                z = z.float()
            h = self._decoder_stem(z)
            features = []
            for i, block in enumerate(self._blocks()):
                h = self._run_block(i, block, h, use_ckpt, temb=latent_embeds)
                features.append(h)
            return features

    def get_first_conv(self, z: torch.Tensor) -> torch.Tensor:
        """``decoder.conv_in`` of decoder-space latents z (N, C_latent, h, w), as the
        reference's ``get_first_conv`` (post_quant_conv first unless reference_compat,
        as in :meth:`get_features`)."""
        return self._decoder_stem(z)

    def get_first_block(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in, the mid block and the resnets of the first up block (no upsampler),
        as the reference's ``get_first_block`` (post_quant_conv first unless
        reference_compat)."""
        h = self._call(self.decoder.mid_block, self._decoder_stem(z))
        for resnet in self.decoder.up_blocks[0].resnets:
            h = self._call(resnet, h, None)
        return h

    def get_first_layer(self, input: torch.Tensor, target: torch.Tensor, target_layer: str = "conv") -> torch.Tensor:
        """The reference's auxiliary first-layer loss: scalar ``mse_loss`` (mean) of
        ``cross_normalize``d (eps 1e-10) features of decoder-space latents ``input``
        (differentiable) and ``target`` (no graph). ``target_layer``: "conv"
        (:meth:`get_first_conv`) or "block" (:meth:`get_first_block`)."""
        if target_layer not in ("conv", "block"):
            raise ValueError(f"target_layer: expected 'conv' or 'block', got {target_layer!r}")
        self._check_pair(input, target)
        features = self.get_first_conv if target_layer == "conv" else self.get_first_block
        feat_in = features(input)
        with torch.no_grad():
            feat_tar = features(target)
        feat_in, feat_tar = cross_normalize(feat_in, feat_tar)
        return F.mse_loss(feat_in, feat_tar, reduction="mean")

    def _mask_and_stats(
        self, index: int, y: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[Dict[str, torch.Tensor]], Optional[torch.Tensor]]:
        """Keep-mask (bool, y's shape) of layer ``index`` or None, its logging stats, and the
        mask's per-plane moments for the feature distance (or None: docs/spec.md, "Loss
        module": with lpl_ext's kernels they spare the feature distance its own pass over
        the mask and, for ``batch``, over y)."""
        keep = stats = moments = None
        with torch.no_grad():
            if self.config.remove_outliers and index in OUTLIER_DOWN_FACTORS:
                closing, opening = outlier_windows(OUTLIER_DOWN_FACTORS[index])
                want_moments = plane_moments_pay_off(y.device)
                out = outlier_mask(y, closing=closing, opening=opening, return_stats=self.config.compute_stats,
                                   return_plane_moments=want_moments)
                out = out if isinstance(out, tuple) else (out,)
                keep = out[0]
                if self.config.compute_stats:
                    raw = out[1]
                    # 0-dim float64 tensors on y's device: mean, std of y * keep, 1 - mean(keep)
                    stats = {"mean": raw.mean.float(), "std": raw.std.float(),
                             "outlier_ratio": raw.outlier_ratio.float()}
                if want_moments:
                    moments = out[-1]
            if self.config.compute_stats and keep is None:  # unmasked layer: plain statistics
                std, mean = torch.std_mean(y)
                stats = {"mean": mean.float(), "std": std.float(),
                         "outlier_ratio": torch.zeros((), dtype=torch.float32, device=y.device)}
        return keep, stats, moments

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
        return list(self._layer_loop(input, target, None))

    def weighted_layer_losses(
        self, input: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(sum_l sum_n sample_weight[n] * loss_l[n], [loss_l (N,) detached] * num_layers)``:
        the weighted reduction of :meth:`layer_losses` with the weights folded into each
        layer's fused gradient (:func:`lpl_ext.weighted_feature_distance`), so backward does
        no rescaling pass per layer. sample_weight: (N,) floating, on input's device."""
        totals: List[torch.Tensor] = []
        # float64 once, as every layer's fused pass takes it (not one conversion per layer)
        losses = list(self._layer_loop(input, target, sample_weight.detach().to(torch.float64), totals))
        return sum(totals[1:], totals[0]).float(), losses

    def _layer_loop(
        self, input: torch.Tensor, target: torch.Tensor, sample_weight: Optional[torch.Tensor],
        totals: Optional[List[torch.Tensor]] = None,
    ) -> Iterator[torch.Tensor]:
        """Yields each layer's (N,) loss; with ``sample_weight``, appends each layer's
        weighted total to ``totals`` and yields the detached loss."""
        self._check_pair(input, target)
        norm = self.config.norm_type
        distance_norm = "none" if (self.reference_compat and norm == "batch") else norm
        use_ckpt = self.config.grad_ckpt and torch.is_grad_enabled()
        stats_list: List[Dict[str, torch.Tensor]] = []
        with self._autocast_context(input.device):
            with torch.no_grad():
                hy = self._decoder_stem(self._prepare_latents(target))
            hx = self._decoder_stem(self._prepare_latents(input))
            for i, block in enumerate(self._blocks()):
                with torch.no_grad():
                    hy = self._run_block(i, block, hy, False)
                hx = self._run_block(i, block, hx, use_ckpt)
                keep, stats, moments = self._mask_and_stats(i, hy)
                if stats is not None:
                    stats_list.append(stats)
                options = dict(norm=distance_norm, distance=self.config.loss_type,
                               weight=_layer_weight(i, self.config.pow_law), plane_moments=moments)
                if sample_weight is None:
                    loss = feature_distance(hx, hy.detach(), keep, **options)
                else:
                    total, loss = weighted_feature_distance(hx, hy.detach(), keep, sample_weight=sample_weight,
                                                            **options)
                    totals.append(total)
                if not self.reference_compat and loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()
                yield loss
        self._set_stats(stats_list)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z).sample``; with frozen-but-trainable parameters, the same
        post_quant_conv + decoder path on detached parameters (see _call)."""
        if (self.config.freeze_vae and torch.is_grad_enabled()
                and any(p.requires_grad for p in self._vae.parameters())):
            pqc = getattr(self._vae, "post_quant_conv", None)
            if pqc is not None and getattr(self._vae.config, "use_post_quant_conv", True):
                z = self._call(pqc, z)
            return self._call(self.decoder, z)
        return self._vae.decode(z).sample

    def _image_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.reference_compat:
            # Reference: whole-image decode of z / scale (no shift), scalar mean.
            x = self._vae_decode(input / self.scale)
            with torch.no_grad():
                y = self._vae_decode(target / self.scale)
            return F.mse_loss(x, y)
        use_ckpt = self.config.grad_ckpt and torch.is_grad_enabled()
        dec = self.decoder

        def decode(z: torch.Tensor, ckpt: bool) -> torch.Tensor:
            h = self._decoder_stem(self._prepare_latents(z))
            for i, block in enumerate(self._blocks(all_up_blocks=True)):
                h = self._run_block(i, block, h, ckpt)
            return self._call(dec.conv_out, self._call(dec.conv_act, self._call(dec.conv_norm_out, h)))

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
        if self.config.feature_type == "image":
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
        c = self.config
        return (f"loss_type={c.loss_type!r}, norm_type={c.norm_type!r}, num_mid_blocks={c.num_blocks}, "
                f"pow_law={c.pow_law}, remove_outliers={c.remove_outliers}, grad_ckpt={c.grad_ckpt}, "
                f"reference_compat={self.reference_compat}, decoder_fp32={c.decoder_fp32}")

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_config(cls, vae: nn.Module, config: LPLConfig) -> "LatentPerceptualLoss":
        """The loss of ``config``'s loss options (``LPLObjective`` builds its loss so); its
        ``config`` is ``config`` itself (the objective options in it are not used here)."""
        if not isinstance(config, LPLConfig):
            raise TypeError(f"config: expected an lpl_ext.LPLConfig, got {type(config).__name__}")
        loss = cls(vae, **{argument: getattr(config, field) for field, argument in _ARGUMENT_NAMES.items()})
        loss.config = config
        return loss

    @property
    def config(self) -> LPLConfig:
        """The options (an :class:`lpl_ext.LPLConfig`; its loss fields are what this loss uses)."""
        return self.__dict__["_config"]

    @config.setter
    def config(self, value: LPLConfig) -> None:
        if not isinstance(value, LPLConfig):
            raise TypeError(f"config: expected an lpl_ext.LPLConfig, got {type(value).__name__}")
        self.__dict__["_config"] = value
        # The reference's elementwise loss module (public attribute there; the fused kernel
        # computes the same distance here, see feature_distance).
        kind = nn.MSELoss if value.loss_type == "mse" else nn.L1Loss
        if not isinstance(getattr(self, "loss_fn", None), kind):
            self.loss_fn = kind(reduction="none")


def _config_attribute(attribute: str, field: str) -> property:
    """The drop-in attribute ``attribute``: reads, and assigning it replaces, ``config.<field>``."""

    def get(self: LatentPerceptualLoss) -> Any:
        return getattr(self.config, field)

    def set_(self: LatentPerceptualLoss, value: Any) -> None:
        self.config = self.config.replace({field: attribute}, **{field: value})

    return property(get, set_, doc=f"``config.{field}`` (the reference's name: {attribute}).")


for _attribute, _field in _ATTRIBUTE_NAMES.items():
    setattr(LatentPerceptualLoss, _attribute, _config_attribute(_attribute, _field))
