"""gradual-sd: GSDNet's gradual self distillation and ACAM attention for any PyTorch backbone."""

from .attention import ACAM, NormalizedACAM
from .distiller import DistillerOutput, GradualSelfDistiller
from .early_exit import EarlyExitModel, ExitOutput
from .heads import BottleneckHead, HeadFactory, PooledHead
from .losses import GradualDistillationLoss, feature_l2, feature_mse, kl_divergence, soft_cross_entropy
from .stages import (
    ModelStages,
    StageInfo,
    default_stage_names,
    describe_stages,
    find_classifier_name,
    list_stages,
)
from .surgery import insert_after, replace_squeeze_excite

__version__ = "0.2.0"

__all__ = [
    "ACAM",
    "NormalizedACAM",
    "GradualSelfDistiller",
    "DistillerOutput",
    "default_stage_names",
    "describe_stages",
    "list_stages",
    "find_classifier_name",
    "StageInfo",
    "ModelStages",
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
    "replace_squeeze_excite",
    "__version__",
]
