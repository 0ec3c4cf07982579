"""gradual-sd: GSDNet's gradual self distillation and ACAM attention for any PyTorch backbone.

The public names below load on first use, so ``import gradual_sd.runtime`` (numpy and
onnxruntime only) works where torch is not installed. The public API is these names and the
``gradual_sd.early_exit`` (calibration policy) and ``gradual_sd.runtime`` (ONNX Runtime)
subpackages; modules whose names start with an underscore are internal.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

if TYPE_CHECKING:  # the public names, each with the module that defines it; __getattr__ reads this block
    from ._attention import ACAM, NormalizedACAM
    from ._classifier import find_classifier_name
    from ._distiller import DistillerOutput, GradualSelfDistiller
    from ._finite import FiniteCheck
    from ._heads import BottleneckHead, HeadFactory, PooledHead
    from ._losses import GradualDistillationLoss, feature_l2, feature_mse, kl_divergence, soft_cross_entropy
    from ._records import StageInfo
    from ._stages import ModelStages, default_stage_names, describe_stages, list_stages
    from ._surgery import ChannelsLast, insert_after, replace_squeeze_excite, squeeze_excite_kinds
    from .early_exit._model import EarlyExitModel
    from .early_exit._routing import ExitOutput


def _sources() -> dict[str, str]:
    """Each public name and its module, from the imports above (written once, for type checkers
    and for the lazy loading alike, as ``lazy_loader`` reads a stub)."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    return {alias.name: node.module for node in block.body for alias in node.names}  # type: ignore[attr-defined]


_SOURCES = _sources()
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
