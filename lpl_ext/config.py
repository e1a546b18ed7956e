"""One LPL configuration, from the trainer's flags to the kernels (docs/api.md, "LPLConfig").

:class:`LPLConfig` holds every option of the LPL loss and of the training objective under
one name each, validated once (here) with one set of messages. The training script's
``--lpl_*`` flags are generated from its fields (``train_sdxl_lpl.py``), ``LPLObjective``
takes it (or its fields as keywords), and ``LatentPerceptualLoss`` is built from it; the
drop-in's reference-named constructor arguments and attributes (``num_mid_blocks``,
``n_blocks``, ``outlier_mask``, ...) are mapped onto the fields in one table there
(``lpl_ext.lpl_loss.REFERENCE_NAMES``).

Each field's metadata says which part uses it (``"part"``: ``"loss"`` or ``"objective"``),
describes it (``"help"``, where ``{field}`` names another option in the caller's spelling),
and how a command line spells it (``"flag"``: the flag's name without dashes, ``None`` for
options no flag sets, ``"type"`` and ``"choices"`` of its values).

Messages name the option as the caller knows it: :meth:`LPLConfig.named` takes a mapping
from field names to those names (``"--lpl_num_blocks"``, ``"num_mid_blocks"``, ...).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ._options import DISTANCES, NORMS

FEATURE_TYPES = ("feature", "image")
CHECKPOINT_GRANULARITIES = ("block", "module")
#: Up blocks of the VAE decoders LPL was defined on (SDXL's has 4).
MAX_BLOCKS = 4


def option(default: Any, part: str, help: str, *, flag: Optional[str] = "", value_type: Optional[type] = None,
           choices: Optional[Tuple[Any, ...]] = None) -> Any:
    """A field of :class:`LPLConfig` with its metadata (``flag=""``: ``lpl_<field>``)."""
    return field(default=default, metadata={"part": part, "help": help, "flag": flag, "type": value_type,
                                            "choices": choices})


@dataclass(frozen=True)
class LPLConfig:
    """Every option of the LPL loss and objective; the defaults are the training
    recommendations of the seed document (``LatentPerceptualLoss`` keeps the reference's
    defaults for its reference-named arguments). Frozen: derive variants with
    :meth:`replace`. Invalid values raise TypeError / ValueError naming the option."""

    # ---- the loss (LatentPerceptualLoss)
    loss_type: str = option("mse", "loss", "Distance of the normalized features: mse or l1.", choices=DISTANCES)
    norm_type: str = option("shared", "loss", "Feature normalization: default (each side by its own channel "
                            "norm), shared (both by the target's), batch (per-channel mean/std of the target) or "
                            "none.", choices=NORMS)
    pow_law: bool = option(True, "loss", "Layer weights 2^-min(i,3).")
    num_blocks: int = option(4, "loss", "Decoder up blocks used after the mid block (0-4).", value_type=int)
    remove_outliers: bool = option(True, "loss", "Mask outliers of the target features (2%/98% quantiles).")
    grad_ckpt: bool = option(True, "loss", "Gradient-checkpoint the VAE decoder blocks inside LPL (independent "
                             "of the UNet's gradient checkpointing).")
    reference_compat: Optional[bool] = option(
        False, "loss", "Reproduce the reference implementation's arithmetic (for comparisons only; "
        "docs/switching.md).")
    feature_type: str = option("feature", "loss", "feature (LPL) or image (MSE of the decoded images).",
                               flag=None, choices=FEATURE_TYPES)
    decoder_fp32: bool = option(True, "loss", "Run the decoder in fp32 with autocast disabled (a float32 VAE).",
                                flag=None)
    compute_stats: bool = option(True, "loss", "Compute the per-layer feature statistics.", flag=None)
    freeze_vae: bool = option(True, "loss", "Never produce gradients for the VAE's parameters.", flag=None)
    checkpoint_granularity: str = option(
        "module", "loss", "With grad_ckpt: checkpoint each resnet/attention/upsampler (module) or each whole "
        "block (block).", flag=None, choices=CHECKPOINT_GRANULARITIES)
    # ---- the objective (LPLObjective)
    t_threshold: Optional[float] = option(200, "objective", "Apply LPL only to samples with timestep t < "
                                          "threshold (high SNR).", value_type=int)
    snr_gamma: Optional[float] = option(None, "objective", "Min-SNR gamma of the {scale} weighting.",
                                        flag="snr_gamma", value_type=float)
    scale: bool = option(False, "objective", "Weight LPL by min(SNR, gamma)/SNR (epsilon) or min(SNR, gamma)/"
                         "(SNR+1) (v). Needs {snr_gamma}. Off by default, as in the reference: with gamma 5 on "
                         "SDXL's schedule it weights epsilon LPL by 0.004 at t=0 rising to 1 at t>=147 (0.58 on "
                         "average over t < 200).")
    start_step: int = option(0, "objective", "First optimiser step that applies LPL.", flag="lpl_start", value_type=int)
    sync_free: bool = option(False, "objective", "Select the samples below {t_threshold} without a host sync: the "
                             "decoder runs on a fixed batch of {capacity} samples, so a GPU micro-batch never waits "
                             "for the host. Same loss; the decoder does more work when few samples qualify, and "
                             "the logged per-layer feature statistics cover every decoded sample.")
    capacity: Optional[int] = option(None, "objective", "With {sync_free}: the decoder batch size (default: the "
                                     "whole micro-batch). Samples beyond it that qualify are left out of that "
                                     "step's LPL.", value_type=int)

    def __post_init__(self) -> None:
        for name, value in _validated(_values(self), _same_name).items():
            object.__setattr__(self, name, value)

    @classmethod
    def named(cls, names: Mapping[str, str], **values: Any) -> "LPLConfig":
        """``LPLConfig(**values)`` whose errors spell each option as ``names[field]``
        (fields not in ``names`` by their own name)."""
        _validated({**_values(cls()), **values}, lambda f: names.get(f, f))
        return cls(**values)

    def replace(self, names: Optional[Mapping[str, str]] = None, **changes: Any) -> "LPLConfig":
        """A copy with ``changes`` (validated; errors spelled through ``names``)."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown LPL option(s) {unknown}; the options are {', '.join(FIELDS)}")
        if names:
            _validated({**_values(self), **changes}, lambda f: names.get(f, f))
        return dataclasses.replace(self, **changes)

    @staticmethod
    def help(name: str, names: Optional[Mapping[str, str]] = None) -> str:
        """The description of option ``name``, other options spelled through ``names``."""
        text = FIELDS[name].metadata["help"]
        return text.format(**{f: (names or {}).get(f, f) for f in FIELDS})


#: The fields of LPLConfig by name, in declaration order.
FIELDS: Dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(LPLConfig)}


def fields_of(part: str) -> Tuple[str, ...]:
    """The options a part uses ("loss" or "objective"), in declaration order."""
    return tuple(name for name, f in FIELDS.items() if f.metadata["part"] == part)


def flag_names() -> Dict[str, str]:
    """{field: flag name without dashes} of the options a command line sets."""
    out = {}
    for name, f in FIELDS.items():
        flag = f.metadata["flag"]
        if flag is not None:
            out[name] = flag or f"lpl_{name}"
    return out


# ---------------------------------------------------------------------- validation


def _values(config: LPLConfig) -> Dict[str, Any]:
    return {name: getattr(config, name) for name in FIELDS}


def _same_name(name: str) -> str:
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _validated(values: Dict[str, Any], name: Callable[[str], str]) -> Dict[str, Any]:
    """The values checked and normalized (bools coerced, norm_type lowercased), or the
    first problem raised as TypeError / ValueError, each option spelled by ``name``."""
    n = {f: name(f) for f in FIELDS}
    v = dict(values)

    def one_of(key: str, options: Tuple[str, ...], value: Any) -> None:
        if not isinstance(value, str) or value not in options:
            raise ValueError(f"{n[key]}: expected one of {options}, got {values[key]!r}")

    one_of("loss_type", DISTANCES, v["loss_type"])
    if isinstance(v["norm_type"], str):
        v["norm_type"] = v["norm_type"].lower()  # the reference lowercases it
    one_of("norm_type", NORMS, v["norm_type"])
    if not _is_int(v["num_blocks"]) or not 0 <= v["num_blocks"] <= MAX_BLOCKS:
        raise ValueError(f"{n['num_blocks']} must be between 0 and {MAX_BLOCKS} (an int: the VAE decoder's up "
                         f"blocks after its mid block, SDXL's has {MAX_BLOCKS}; 0 = the mid block only), got "
                         f"{v['num_blocks']!r}")
    v["num_blocks"] = int(v["num_blocks"])
    one_of("feature_type", FEATURE_TYPES, v["feature_type"])
    if v["reference_compat"] is not None:
        if not isinstance(v["reference_compat"], (bool, np.bool_)):
            raise TypeError(f"{n['reference_compat']}: expected a bool or None, got "
                            f"{type(v['reference_compat']).__name__}")
        v["reference_compat"] = bool(v["reference_compat"])
    if v["checkpoint_granularity"] not in CHECKPOINT_GRANULARITIES:
        raise ValueError(f"{n['checkpoint_granularity']}: expected 'block' or 'module', got "
                         f"{v['checkpoint_granularity']!r}")
    for key in ("pow_law", "remove_outliers", "grad_ckpt", "decoder_fp32", "compute_stats", "freeze_vae", "scale"):
        v[key] = bool(v[key])

    if v["t_threshold"] is not None:
        if not _is_real(v["t_threshold"]):
            raise TypeError(f"{n['t_threshold']}: expected a number or None, got {type(v['t_threshold']).__name__}")
        if not v["t_threshold"] >= 0:
            raise ValueError(f"{n['t_threshold']} must be >= 0 (None: every sample), got {v['t_threshold']}")
    if v["snr_gamma"] is not None:
        if not _is_real(v["snr_gamma"]):
            raise TypeError(f"{n['snr_gamma']}: expected a number or None, got {type(v['snr_gamma']).__name__}")
        if not v["snr_gamma"] > 0:
            raise ValueError(f"{n['snr_gamma']} must be > 0, got {v['snr_gamma']}")
        v["snr_gamma"] = float(v["snr_gamma"])
    if v["scale"] and v["snr_gamma"] is None:
        # The reference silently ignores scale without snr_gamma; refuse instead.
        raise ValueError(f"{n['scale']} weights LPL by min(SNR, gamma)/SNR and therefore needs {n['snr_gamma']}; "
                         f"without it the option would do nothing (the reference silently ignores it). Set "
                         f"{n['snr_gamma']} or drop {n['scale']}.")
    if not _is_int(v["start_step"]):
        raise TypeError(f"{n['start_step']}: expected an int, got {type(v['start_step']).__name__}")
    if v["start_step"] < 0:
        raise ValueError(f"{n['start_step']} must be >= 0, got {v['start_step']}")
    v["start_step"] = int(v["start_step"])
    if not isinstance(v["sync_free"], (bool, np.bool_)):
        raise TypeError(f"{n['sync_free']}: expected a bool, got {type(v['sync_free']).__name__}")
    v["sync_free"] = bool(v["sync_free"])
    if v["capacity"] is not None:
        if not _is_int(v["capacity"]):
            raise TypeError(f"{n['capacity']}: expected an int or None, got {type(v['capacity']).__name__}")
        if v["capacity"] < 1:
            raise ValueError(f"{n['capacity']} must be a positive number of samples, got {v['capacity']}")
        if not v["sync_free"]:
            raise ValueError(f"{n['capacity']} sets the decoder batch of {n['sync_free']}; add {n['sync_free']} "
                             f"or drop {n['capacity']}.")
        v["capacity"] = int(v["capacity"])
    return v


__all__ = ["FIELDS", "LPLConfig", "fields_of", "flag_names"]
