"""lpl_ext: fused C/CUDA Latent Perceptual Loss (Berrada et al., ICLR 2025) for SDXL."""

from ._backend import BackendFallbackWarning, build_info
from .feature_distance import FeatureDistanceFunction, feature_distance, weighted_feature_distance
from .outlier_mask import OutlierStats, outlier_mask, outlier_windows
from ._backend import torch as _torch

from .config import LPLConfig

if _torch is not None:  # the VAE-level loss and the objective need torch
    from .lpl_loss import LatentPerceptualLoss, cross_normalize, normalize_tensor, remove_outliers
    from .objective import LPLObjective, predict_z0, snr_weights

from ._version import __version__

__all__ = [
    "BackendFallbackWarning",
    "FeatureDistanceFunction",
    "LPLConfig",
    "LPLObjective",
    "LatentPerceptualLoss",
    "OutlierStats",
    "build_info",
    "cross_normalize",
    "feature_distance",
    "normalize_tensor",
    "outlier_mask",
    "outlier_windows",
    "predict_z0",
    "remove_outliers",
    "snr_weights",
    "weighted_feature_distance",
    "__version__",
]
