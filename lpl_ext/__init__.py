"""lpl_ext: fused C/CUDA Latent Perceptual Loss (Berrada et al., ICLR 2025) for SDXL."""

from ._backend import build_info
from .feature_distance import FeatureDistanceFunction, feature_distance

__version__ = "0.1.0"

__all__ = [
    "FeatureDistanceFunction",
    "build_info",
    "feature_distance",
    "__version__",
]
