"""gradual-sd: GSDNet's gradual self distillation and ACAM attention for any PyTorch backbone."""

from .attention import ACAM, NormalizedACAM
from .distiller import DistillerOutput, GradualSelfDistiller, default_stage_names
from .early_exit import EarlyExitModel, ExitOutput
from .heads import BottleneckHead, HeadFactory, PooledHead
from .losses import GradualDistillationLoss, feature_l2, feature_mse, kl_divergence, soft_cross_entropy
from .surgery import insert_after

__version__ = "0.1.0"

__all__ = [
    "ACAM",
    "NormalizedACAM",
    "GradualSelfDistiller",
    "DistillerOutput",
    "default_stage_names",
    "EarlyExitModel",
    "ExitOutput",
    "GradualDistillationLoss",
    "soft_cross_entropy",
    "kl_divergence",
    "feature_l2",
    "feature_mse",
    "BottleneckHead",
    "PooledHead",
    "HeadFactory",
    "insert_after",
    "__version__",
]
