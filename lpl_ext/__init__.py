"""lpl_ext: fused C/CUDA Latent Perceptual Loss (Berrada et al., ICLR 2025) for SDXL."""

from ._backend import build_info
from .feature_distance import FeatureDistanceFunction, feature_distance
from .outlier_mask import OutlierStats, outlier_mask, outlier_windows

__version__ = "0.1.0"

__all__ = [
    "FeatureDistanceFunction",
    "OutlierStats",
    "build_info",
    "feature_distance",
    "outlier_mask",
    "outlier_windows",
    "__version__",
]
