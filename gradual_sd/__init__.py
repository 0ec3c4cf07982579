"""gradual-sd: GSDNet's gradual self distillation and ACAM attention for any PyTorch backbone.

The public names below load on first use, so ``import gradual_sd.runtime`` (numpy and
onnxruntime only) works where torch is not installed. The public API is these names and the
``gradual_sd.early_exit`` (calibration policy) and ``gradual_sd.runtime`` (ONNX Runtime)
subpackages; modules whose names start with an underscore are internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

# Each public name and the module that defines it.
_SOURCES = {
    "ACAM": "_attention",
    "NormalizedACAM": "_attention",
    "GradualSelfDistiller": "_distiller",
    "DistillerOutput": "_distiller",
    "FiniteCheck": "_finite",
    "default_stage_names": "_stages",
    "describe_stages": "_stages",
    "list_stages": "_stages",
    "find_classifier_name": "_stages",
    "StageInfo": "_stages",
    "ModelStages": "_stages",
    "EarlyExitModel": "early_exit._model",
    "ExitOutput": "early_exit._routing",
    "GradualDistillationLoss": "_losses",
    "soft_cross_entropy": "_losses",
    "kl_divergence": "_losses",
    "feature_l2": "_losses",
    "feature_mse": "_losses",
    "BottleneckHead": "_heads",
    "PooledHead": "_heads",
    "HeadFactory": "_heads",
    "insert_after": "_surgery",
    "replace_squeeze_excite": "_surgery",
    "ChannelsLast": "_surgery",
    "squeeze_excite_kinds": "_surgery",
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


if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from ._attention import ACAM, NormalizedACAM
    from ._distiller import DistillerOutput, GradualSelfDistiller
    from ._finite import FiniteCheck
    from ._heads import BottleneckHead, HeadFactory, PooledHead
    from ._losses import GradualDistillationLoss, feature_l2, feature_mse, kl_divergence, soft_cross_entropy
    from ._stages import (
        ModelStages,
        StageInfo,
        default_stage_names,
        describe_stages,
        find_classifier_name,
        list_stages,
    )
    from ._surgery import ChannelsLast, insert_after, replace_squeeze_excite, squeeze_excite_kinds
    from .early_exit._model import EarlyExitModel
    from .early_exit._routing import ExitOutput
