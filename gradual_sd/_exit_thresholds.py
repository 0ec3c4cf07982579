"""The exit rule's thresholds, checked the same way by the PyTorch and the ONNX Runtime exit models.

A sample leaves at an auxiliary head when its top softmax probability is ``>=`` that head's
threshold; 0 takes every sample, and a threshold above 1 disables the head, which then is not
run at all. Plain Python (no torch, no numpy), so :mod:`gradual_sd.runtime` can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["checked_thresholds", "is_enabled"]


def is_enabled(threshold: float) -> bool:
    """Whether a head with this threshold runs (thresholds above 1 disable it)."""
    return threshold <= 1


def checked_thresholds(thresholds: Sequence[float] | float, stage_names: Sequence[str]) -> tuple[float, ...]:
    """One float per head after ``stage_names`` (a single number applies to all), or a
    ``ValueError`` naming the count or the values that are not numbers ``>= 0``."""
    single = isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool)
    values = [thresholds] * len(stage_names) if single else list(thresholds)  # type: ignore[arg-type]
    if len(values) != len(stage_names):
        raise ValueError(
            f"need {len(stage_names)} thresholds (one per head after {list(stage_names)}), "
            f"got {len(values)}: {values}"
        )
    bad = [
        v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0
    ]
    if bad:
        raise ValueError(f"thresholds must be numbers >= 0 (above 1 disables a head), got {bad}")
    return tuple(float(v) for v in values)
