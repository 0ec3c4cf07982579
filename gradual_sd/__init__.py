"""gradual-sd: GSDNet's gradual self distillation and ACAM attention for any PyTorch backbone.

The public names below load on first use, so ``import gradual_sd.runtime`` (numpy and
onnxruntime only) works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

# Each public name and the module that defines it.
_SOURCES = {
    "ACAM": "attention",
    "NormalizedACAM": "attention",
    "GradualSelfDistiller": "distiller",
    "DistillerOutput": "distiller",
    "default_stage_names": "stages",
    "describe_stages": "stages",
    "list_stages": "stages",
    "find_classifier_name": "stages",
    "StageInfo": "stages",
    "ModelStages": "stages",
    "EarlyExitModel": "early_exit",
    "ExitOutput": "early_exit",
    "GradualDistillationLoss": "losses",
    "soft_cross_entropy": "losses",
    "kl_divergence": "losses",
    "feature_l2": "losses",
    "feature_mse": "losses",
    "BottleneckHead": "heads",
    "PooledHead": "heads",
    "HeadFactory": "heads",
    "insert_after": "surgery",
    "replace_squeeze_excite": "surgery",
}

__all__ = [*_SOURCES, "__version__"]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'gradual_sd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
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
