"""Trainer-agnostic LPL objective (docs/spec.md, "Training integration").

Built once from the VAE and the options, called once per step with the model prediction,
the noisy latents, the clean latents, the timesteps and the noise schedule; returns the
scalar LPL term (the trainer adds ``lpl_weight * lpl`` to its diffusion loss) and a dict of
0-dim logging tensors. Fixes of the reference training script: works for any
``start_step``; SNR weights are computed on the selected samples only; ``scale`` without
``snr_gamma`` is an error instead of a silent no-op; z0_hat is computed in fp32.

Host syncs: by default exactly one per call that reaches the threshold test, the
``nonzero`` that selects the samples below ``t_threshold`` (its size decides the decoder's
batch), skipped entirely before ``start_step``. Everything else, logs included, stays on
the device (measured in tests/test_objective.py with a dispatch-mode counter of
data-dependent ops). Pass ``timesteps`` and ``sigmas`` on the latents' device; a host
``alphas_cumprod`` is copied to the device once and cached (a copy per step would be a
sync).

``sync_free=True`` removes that sync, so a compiled (``torch.compile(fullgraph=True)``) or
CUDA-graphed step runs without a break: the decoder batch has a fixed size, either the
whole batch (``capacity=None``) or ``capacity`` slots filled with the samples below the
threshold in batch order. A decoded sample that is not selected (above the threshold, or
padding) decodes its own target latents in place of z0_hat, so it adds exactly 0 to the
loss and gets exactly 0 gradient; the mean is over the selected samples. The price is
decoding more samples than qualify (with ``t_threshold=200`` of 1000 about 5x the default's
decoder work for ``capacity=None``); when more than ``capacity`` samples qualify, the ones
past the capacity are left out of that step. The per-layer feature statistics then cover
every decoded sample.

Schedules:
    epsilon / v_prediction / sample: ``alphas_cumprod`` (T,) indexed by ``timesteps``
        (integer-valued, cast to long); alpha_t = sqrt(ac[t]), sigma_t = sqrt(1 - ac[t]),
        snr = ac[t] / (1 - ac[t]). ``sample`` needs it only for ``scale``.
    flow_matching: ``sigmas`` holds the per-sample t in [0, 1], shape (N,) (or anything
        with N values, e.g. (N, 1, 1, 1)), aligned with the batch, NOT indexed by
        timesteps; z_t = (1 - t) z0 + t eps, the model predicts v = eps - z0,
        z0_hat = z_t - t v, snr = ((1 - t) / t)^2. ``timesteps`` is still what
        ``t_threshold`` compares against (e.g. 1000 * t in SD3-style trainers).

SNR weights with ``scale=True`` (Min-SNR-gamma written for each parameterization):
    epsilon min(snr, g) / snr; v_prediction min(snr, g) / (snr + 1); sample min(snr, g);
    flow_matching min(snr, g) * t^2 (since z0_hat - z0 = -t (v_hat - v)).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import LPLConfig, fields_of
from .lpl_loss import LatentPerceptualLoss

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_matching")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _per_sample(values: torch.Tensor, n: int, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values)
    if values.numel() != n:
        raise ValueError(f"{name}: expected {n} per-sample values (shape (N,)), got shape {tuple(values.shape)}")
    return values.reshape(n).to(device)


def _alpha_sigma(
    alphas_cumprod: Optional[torch.Tensor], timesteps: torch.Tensor, device: torch.device, why: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, snr_t) per sample, float32, from alphas_cumprod (T,) at timesteps."""
    if alphas_cumprod is None:
        raise ValueError(f"alphas_cumprod: required {why}")
    if not isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
    if alphas_cumprod.dim() != 1:
        raise ValueError(f"alphas_cumprod: expected shape (T,), got {tuple(alphas_cumprod.shape)}")
    ac = alphas_cumprod.to(device).index_select(0, timesteps.reshape(-1).long())
    return ac.sqrt().float(), (1 - ac).sqrt().float(), (ac / (1 - ac)).float()


def _gather(t: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t's rows at index along dim 0 (t itself without an index; None stays None)."""
    if t is None or index is None:
        return t
    return t.index_select(0, index)


def predict_z0(
    model_pred: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    prediction_type: str,
    alphas_cumprod: Optional[torch.Tensor] = None,
    sigmas: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Clean-latent estimate z0_hat (N, C, h, w) float32 from a prediction, in fp32.

    epsilon: (z_t - sigma_t eps) / alpha_t; v_prediction: alpha_t z_t - sigma_t v;
    sample: the prediction; flow_matching: z_t - t v (``sigmas`` = per-sample t, (N,)).
    Also recovers the clean latents from a trainer's regression target (pass the target as
    ``model_pred``). ``noisy_latents`` should be the fp32 z_t, not a low-precision copy.
    """
    _check_prediction_type(prediction_type)
    if model_pred.shape != noisy_latents.shape:
        raise ValueError(f"noisy_latents: shape {tuple(noisy_latents.shape)} differs from model_pred "
                         f"{tuple(model_pred.shape)}")
    n = model_pred.shape[0]
    device = model_pred.device
    shape = (n,) + (1,) * (model_pred.dim() - 1)
    if prediction_type == "sample":
        return model_pred.float()
    pred, z_t = model_pred.float(), noisy_latents.float()
    if prediction_type == "flow_matching":
        if sigmas is None:
            raise ValueError("sigmas: required for prediction_type='flow_matching' (per-sample t, shape (N,))")
        t = _per_sample(sigmas, n, "sigmas", device).float().view(shape)
        return z_t - t * pred
    timesteps = _per_sample(timesteps, n, "timesteps", device)
    alpha, sigma, _ = _alpha_sigma(alphas_cumprod, timesteps, device, f"for prediction_type={prediction_type!r}")
    alpha, sigma = alpha.view(shape), sigma.view(shape)
    if prediction_type == "epsilon":
        return (z_t - sigma * pred) / alpha
    return alpha * z_t - sigma * pred


def snr_weights(
    timesteps: torch.Tensor,
    snr_gamma: float,
    *,
    prediction_type: str,
    alphas_cumprod: Optional[torch.Tensor] = None,
    sigmas: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights (N,) float32 (see the module docstring)."""
    _check_prediction_type(prediction_type)
    n = timesteps.numel()
    device = timesteps.device
    if prediction_type == "flow_matching":
        if sigmas is None:
            raise ValueError("sigmas: required for prediction_type='flow_matching'")
        t = _per_sample(sigmas, n, "sigmas", device).float()
        snr = ((1 - t) / t) ** 2
        return torch.clamp(snr, max=snr_gamma) * t * t
    _, _, snr = _alpha_sigma(alphas_cumprod, timesteps, device, "for SNR weights")
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class LPLObjective(nn.Module):
    """The LPL term of a diffusion training step.

    Args:
        vae: the (frozen) diffusers ``AutoencoderKL``; kept out of ``parameters()``.
        config: the options, an :class:`lpl_ext.LPLConfig` (default: its defaults, the
            seed document's recommendations); keywords (LPLConfig's field names) override
            single options. Those the objective uses itself:
        t_threshold: apply LPL to samples with ``timesteps < t_threshold`` (None: all).
        snr_gamma: Min-SNR gamma for ``scale``.
        scale: weight each sample's LPL by its SNR weight (requires ``snr_gamma``).
        start_step: return 0 while ``global_step < start_step``.
        sync_free: select the samples below the threshold without a host sync (fixed
            decoder batch; see the module docstring). Default False: one sync per call,
            the decoder sees only the selected samples.
        capacity: with ``sync_free``, the decoder batch size (at most the batch size is
            used); None decodes the whole batch.
        The others configure its :class:`LatentPerceptualLoss` (``num_blocks`` is its
        ``num_mid_blocks``; ``feature_type`` must be "feature"). They read back as
        ``objective.config.<name>``, the objective's own also as ``objective.<name>``.

    Call: ``lpl, logs = obj(model_pred, noisy_latents, latents, timesteps, *,
    prediction_type, alphas_cumprod=None, sigmas=None, global_step=0)`` with
    model_pred/noisy_latents/latents (N, C, h, w) and timesteps (N,). ``lpl`` is a 0-dim
    float32 tensor (the mean over the selected samples of their, optionally SNR-weighted,
    LPL; 0 when none qualifies or before ``start_step``). ``logs`` always has the keys
    :meth:`log_keys` names for the loss's layers: lpl_loss, lpl_applied_ratio (fraction of
    the batch used), lpl_num_samples and, per layer i, lpl_layer{i}_loss (unweighted mean
    over the selected samples), lpl_layer{i}_mean, lpl_layer{i}_std,
    lpl_layer{i}_outlier_ratio (zeros when nothing was applied).
    """

    #: Keys of every call's logs, in order; BATCH_KEYS describe the whole micro-batch, the
    #: others are means over the samples LPL was applied to (weigh them by lpl_num_samples
    #: when averaging over micro-batches).
    SUMMARY_KEYS: Tuple[str, ...] = ("lpl_loss", "lpl_applied_ratio", "lpl_num_samples")
    BATCH_KEYS: Tuple[str, ...] = ("lpl_applied_ratio", "lpl_num_samples")
    #: Per-layer keys, lpl_layer{i}_<stat>.
    LAYER_STATS: Tuple[str, ...] = ("loss", "mean", "std", "outlier_ratio")

    def __init__(self, vae: nn.Module, config: Optional[LPLConfig] = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            config = LPLConfig().replace(**options)
        elif not isinstance(config, LPLConfig):
            raise TypeError(f"config: expected an lpl_ext.LPLConfig, got {type(config).__name__}")
        else:
            config = config.replace(**options)
        if config.feature_type != "feature":
            raise ValueError(f"feature_type: LPLObjective needs 'feature' (per-layer feature losses), got "
                             f"{config.feature_type!r}")
        self.config = config
        self.loss = LatentPerceptualLoss.from_config(vae, config)
        self._schedule_cache: Optional[Tuple[torch.Tensor, int, torch.Tensor]] = None

    def __getattr__(self, name: str) -> Any:
        # The objective's own options read as attributes (objective.t_threshold, ...).
        if name in _OBJECTIVE_FIELDS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OBJECTIVE_FIELDS:  # assigning one replaces the config (validated)
            name, value = "config", self.config.replace({name: name}, **{name: value})
        super().__setattr__(name, value)

    @classmethod
    def log_keys(cls, num_blocks: int) -> List[str]:
        """The keys of the logs of an objective with ``num_blocks`` up blocks (num_blocks + 1
        layers), in order: the one schema of what it logs (trainers take their metric names
        from it)."""
        return list(cls.SUMMARY_KEYS) + [f"lpl_layer{i}_{stat}" for i in range(num_blocks + 1)
                                         for stat in cls.LAYER_STATS]

    def _schedule_on(self, alphas_cumprod: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
        """alphas_cumprod on ``device``, copied once and cached (a fresh host-to-device copy
        every step would be a host sync)."""
        if alphas_cumprod is None or not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.device == device:
            return alphas_cumprod
        cached = self._schedule_cache
        if (cached is not None and cached[0] is alphas_cumprod and cached[1] == alphas_cumprod._version
                and cached[2].device == device):
            return cached[2]
        moved = alphas_cumprod.to(device)
        self._schedule_cache = (alphas_cumprod, alphas_cumprod._version, moved)
        return moved

    @property
    def num_layers(self) -> int:
        return self.loss.num_layers

    def _log_dict(
        self, summary: Dict[str, torch.Tensor], layers: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """The logs in :meth:`log_keys` order, from the summary values (SUMMARY_KEYS) and one
        dict of LAYER_STATS per layer; a value missing for a key is a KeyError here, not a
        key silently absent from the logs."""
        values = [summary[key] for key in self.SUMMARY_KEYS]
        values += [layer[stat] for layer in layers for stat in self.LAYER_STATS]
        return dict(zip(self.log_keys(len(layers) - 1), values))

    def _empty_logs(self, device: torch.device, applied_ratio: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.float32, device=device)
        summary = dict.fromkeys(self.SUMMARY_KEYS, zero)
        if applied_ratio is not None:
            summary["lpl_applied_ratio"] = applied_ratio
        return self._log_dict(summary, [dict.fromkeys(self.LAYER_STATS, zero)] * self.num_layers)

    @staticmethod
    def _zero_like_graph(model_pred: torch.Tensor) -> torch.Tensor:
        # 0 that is still connected to the graph (backward works) without multiplying
        # any value by zero (0 * inf would be NaN).
        return model_pred.reshape(-1)[:0].float().sum()

    def forward(
        self,
        model_pred: torch.Tensor,
        noisy_latents: torch.Tensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        prediction_type: str,
        alphas_cumprod: Optional[torch.Tensor] = None,
        sigmas: Optional[torch.Tensor] = None,
        global_step: int = 0,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        _check_prediction_type(prediction_type)
        for name, t in (("model_pred", model_pred), ("noisy_latents", noisy_latents), ("latents", latents)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: expected an (N, C, h, w) tensor")
            if t.shape != model_pred.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} differs from model_pred {tuple(model_pred.shape)}")
        n = model_pred.shape[0]
        device = model_pred.device
        timesteps = _per_sample(timesteps, n, "timesteps", device)
        if global_step < self.config.start_step:
            return self._zero_like_graph(model_pred), self._empty_logs(device, None)
        alphas_cumprod = self._schedule_on(alphas_cumprod, device)
        if sigmas is not None:
            sigmas = _per_sample(sigmas, n, "sigmas", device)
        if self.config.sync_free:
            return self._forward_sync_free(model_pred, noisy_latents, latents, timesteps,
                                           prediction_type=prediction_type, alphas_cumprod=alphas_cumprod,
                                           sigmas=sigmas)

        below = self._below(timesteps, n, device)
        index = None
        count = n
        if self.config.t_threshold is not None:
            index = below.nonzero().reshape(-1)  # the one host sync: its size is the batch
            count = index.numel()
            if count == n:
                index = None  # everything qualifies: no gather copies
        applied_ratio = below.float().mean()
        if count == 0:
            return self._zero_like_graph(model_pred), self._empty_logs(device, applied_ratio)

        pick = functools.partial(_gather, index=index)

        sel_sigmas = pick(sigmas)
        sel_t = pick(timesteps)
        z0_hat = predict_z0(pick(model_pred), pick(noisy_latents), sel_t, prediction_type=prediction_type,
                            alphas_cumprod=alphas_cumprod, sigmas=sel_sigmas)
        if self.config.scale:
            weights = snr_weights(sel_t, self.config.snr_gamma, prediction_type=prediction_type,
                                  alphas_cumprod=alphas_cumprod, sigmas=sel_sigmas)
        else:
            weights = torch.ones(count, dtype=torch.float32, device=device)
        # lpl = mean_n(weights[n] * mean_l loss_l[n]), the weights folded into the kernels' gradient
        lpl, layer_losses = self._weighted_lpl(z0_hat, pick(latents).float(), weights / count)
        layer_means = [layer.detach().float().mean() for layer in layer_losses]
        return lpl, self._logs(lpl, applied_ratio, below.sum().float(), layer_means, device)

    def _weighted_lpl(
        self, z0_hat: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(sum_n sample_weight[n] * mean_l loss_l[n] as a float32 0-dim tensor, the per-layer
        (N,) losses). On decoder features the weights are folded into each layer's fused
        gradient (``LatentPerceptualLoss.weighted_layer_losses``): backward then has no
        rescaling pass per layer, and none at all when its upstream gradient is 1."""
        if self.loss.config.feature_type == "image":
            layer_losses = self.loss.get_loss(z0_hat, target, get_hist=True)
            per_sample = (sum(layer_losses) / len(layer_losses)).float()
            return (per_sample * sample_weight).sum(), layer_losses
        return self.loss.weighted_layer_losses(z0_hat, target, sample_weight / self.loss.num_layers)

    def _below(self, timesteps: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """(N,) bool: the samples LPL applies to (t < t_threshold; all without a threshold)."""
        if self.config.t_threshold is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        return timesteps < self.config.t_threshold

    def _logs(
        self, lpl: torch.Tensor, applied_ratio: torch.Tensor, num_samples: torch.Tensor,
        layer_means: List[torch.Tensor], device: torch.device,
    ) -> Dict[str, torch.Tensor]:
        summary = {"lpl_loss": lpl.detach(), "lpl_applied_ratio": applied_ratio,
                   "lpl_num_samples": num_samples}  # device-side: no host-to-device copy
        stats = self.loss.last_feature_stats_tensors  # 0-dim tensors: no host sync
        zero = torch.zeros((), device=device) if len(stats) < len(layer_means) else None
        no_stats = dict.fromkeys(self.LAYER_STATS, zero)
        layers = [{**(stats[i] if i < len(stats) else no_stats), "loss": layer}
                  for i, layer in enumerate(layer_means)]
        return self._log_dict(summary, layers)

    def _forward_sync_free(
        self,
        model_pred: torch.Tensor,
        noisy_latents: torch.Tensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        prediction_type: str,
        alphas_cumprod: Optional[torch.Tensor],
        sigmas: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The objective with a fixed decoder batch and no host sync (``sync_free=True``)."""
        n = model_pred.shape[0]
        device = model_pred.device
        below = self._below(timesteps, n, device)
        index: Optional[torch.Tensor] = None
        used = below
        if self.config.capacity is not None and self.config.capacity < n:
            # The first `capacity` samples below the threshold in batch order, padded with
            # the others: a stable sort of the 0/1 key "not selected" (no sync, fixed size).
            index = torch.sort((~below).to(torch.uint8), stable=True).indices[: self.config.capacity]
            used = below.index_select(0, index)

        pick = functools.partial(_gather, index=index)

        sel_t = pick(timesteps)
        sel_sigmas = pick(sigmas)
        target = pick(latents).float()
        z0_hat = predict_z0(pick(model_pred), pick(noisy_latents), sel_t, prediction_type=prediction_type,
                            alphas_cumprod=alphas_cumprod, sigmas=sel_sigmas)
        # A sample that is not used decodes its own target: its loss and its gradient are
        # exactly 0 (selected with where, never multiplied by 0: a non-finite z0_hat of a
        # high-noise sample must not turn into NaN).
        keep = used.view(-1, *([1] * (z0_hat.dim() - 1)))
        zero = torch.zeros((), dtype=torch.float32, device=device)
        count = used.sum()
        denom = count.clamp(min=1).float()
        if self.config.scale:
            weights = snr_weights(sel_t, self.config.snr_gamma, prediction_type=prediction_type,
                                  alphas_cumprod=alphas_cumprod, sigmas=sel_sigmas)
            weights = torch.where(used, weights, zero)  # a selection: an unused sample's NaN weight stays out
        else:
            weights = used.float()
        lpl, layer_losses = self._weighted_lpl(torch.where(keep, z0_hat, target), target, weights / denom)
        layer_means = [torch.where(used, layer.detach().float(), zero).sum() / denom for layer in layer_losses]
        return lpl, self._logs(lpl, count.float() / n, count.float(), layer_means, device)


_OBJECTIVE_FIELDS = frozenset(fields_of("objective"))
