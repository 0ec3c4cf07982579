"""The exit rule's thresholds, checked the same way by the PyTorch and the ONNX Runtime exit models.

A sample leaves at an auxiliary head when its top softmax probability is ``>=`` that head's
threshold; 0 takes every sample, and ``math.inf`` disables the head, which then is not run at
all. Plain Python (no torch, no numpy), so :mod:`gradual_sd.runtime` can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def is_enabled(threshold: float) -> bool:
    """Whether a head with this threshold runs (thresholds above 1 disable it)."""
    return threshold <= 1


def saved_thresholds(thresholds: Sequence[float]) -> list[float | None]:
    """Thresholds as JSON holds them: a disabled head's as ``null``."""
    return [t if is_enabled(t) else None for t in thresholds]


def loaded_thresholds(saved: Sequence[float | None]) -> list[float]:
    """Thresholds read back from :func:`saved_thresholds`' form."""
    return [math.inf if t is None else t for t in saved]


def is_threshold(value: object) -> bool:
    """A probability in ``[0, 1]`` or ``math.inf``. A finite value above 1 would disable the
    head as surely as ``math.inf``, but is far more often a percentage (95 for 0.95)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= 1 or value == math.inf


def percent_hint(name: str, value: object) -> str:
    """``"; a percentage? pass name=..."`` where ``value`` (a number, or a list of them) is in
    (1, 100], else ``""``: the fix for 95 written where 0.95 was meant."""
    values = value if isinstance(value, list) else [value]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers or len(numbers) != len(values) or not all(1 < v <= 100 for v in numbers):
        return ""
    meant = [round(v / 100, 6) for v in numbers]
    if not isinstance(value, list):
        return f"; a percentage? pass {name}={meant[0]}"
    return f"; percentages? pass {name}={meant}"


def checked_thresholds(thresholds: Sequence[float] | float, stage_names: Sequence[str]) -> tuple[float, ...]:
    """One float per head after ``stage_names`` (a single number applies to all), or a
    ``ValueError`` naming the count or the values that are not probabilities in ``[0, 1]`` or
    ``math.inf``."""
    single = isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool)
    values = [thresholds] * len(stage_names) if single else list(thresholds)  # type: ignore[arg-type]
    if len(values) != len(stage_names):
        raise ValueError(
            f"need {len(stage_names)} thresholds (one per head after {list(stage_names)}), "
            f"got {len(values)}: {values}"
        )
    bad = [v for v in values if not is_threshold(v)]
    if bad:
        raise ValueError(
            "thresholds are probabilities in [0, 1], or math.inf to disable a head; got "
            f"{bad}{percent_hint('thresholds', thresholds if single else values)}"
        )
    return tuple(float(v) for v in values)
