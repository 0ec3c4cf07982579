"""Calibration and the accuracy-compute trade-off, simulated from one full pass over held-out data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._exit_thresholds import is_threshold, percent_hint
from ._policy import ExitCosts, check_fraction, choose_thresholds, choose_thresholds_within_cost, evaluate
from ._costs import exit_costs
from ._data import Data, collect, device_of, first_images

if TYPE_CHECKING:
    from ._model import EarlyExitModel


class Outcomes(NamedTuple):
    logits: list[torch.Tensor]  # every exit's, over the data, on the CPU
    targets: torch.Tensor
    confidence: torch.Tensor  # (heads, N): each head's top softmax probability
    correct: torch.Tensor  # (heads + 1, N): whether each exit is right
    costs: ExitCosts
    input_shape: tuple[int, ...]  # one input's, without the batch axis


def outcomes(exits: EarlyExitModel, data: Data, show_progress: bool | None, desc: str) -> Outcomes:
    """Every exit's logits and the targets over ``data`` (one full pass), and what routing
    is simulated from: each head's confidence, whether each exit is right, the costs."""
    logits, targets = collect(exits, data, show_progress, desc)
    first = first_images(data, device_of(exits.model), 1)
    confidence = torch.stack([F.softmax(z, -1).amax(-1) for z in logits[:-1]])
    correct = torch.stack([z.argmax(-1) == targets for z in logits])
    return Outcomes(logits, targets, confidence, correct, exit_costs(exits, first), tuple(first.shape[1:]))


def check_levels(levels: Sequence[float]) -> None:
    """Refuse trade-off levels that are not thresholds (probabilities in [0, 1] or ``math.inf``),
    before the pass over the data."""
    bad = [level for level in levels if not is_threshold(level)]
    if bad:
        raise ValueError(
            "levels are thresholds for every head: probabilities in [0, 1], or math.inf for every "
            f"head disabled; got {bad}{percent_hint('levels', list(levels))}"
        )


def curve(found: Outcomes, levels: Sequence[float]) -> list[dict[str, float]]:
    """Accuracy and relative FLOPs with every head at each threshold level."""
    _, _, confidence, correct, costs, _ = found
    points = []
    for level in levels:
        accuracy, flops = evaluate(confidence, correct, costs, [level] * confidence.shape[0])
        points.append({"threshold": level, "accuracy": accuracy, "flops_ratio": flops / costs.full})
    return points


def calibrate(
    exits: EarlyExitModel,
    data: Data,
    max_accuracy_drop: float | None,
    max_cost: float | None,
    show_progress: bool | None,
) -> dict[str, Any]:
    """Set ``exits``' thresholds for an accuracy target (:func:`~gradual_sd.early_exit.choose_thresholds`)
    or a compute budget (:func:`~gradual_sd.early_exit.choose_thresholds_within_cost`); what
    they reach on ``data``."""
    if max_accuracy_drop is not None and max_cost is not None:
        raise ValueError(
            f"pass max_accuracy_drop ({max_accuracy_drop}) or max_cost ({max_cost}), not both: "
            "one is the target, the other what it costs"
        )
    if max_cost is not None:
        check_fraction("max_cost", max_cost)  # before the pass over the data, not after
    drop = 0.005 if max_accuracy_drop is None else max_accuracy_drop
    check_fraction("max_accuracy_drop", drop)
    _, _, confidence, correct, costs, input_shape = outcomes(exits, data, show_progress, "calibrate")
    if max_cost is not None:
        chosen = choose_thresholds_within_cost(confidence, correct, costs, max_cost)
    else:
        chosen = choose_thresholds(confidence, correct, costs, drop)
    exits.set_thresholds(chosen)
    exits.input_shape = input_shape  # the thresholds hold at this size: export_onnx's default
    accuracy, flops = evaluate(confidence, correct, costs, exits.thresholds)
    full_accuracy = correct[-1].double().mean().item()
    return {
        "thresholds": list(exits.thresholds),
        "accuracy": accuracy,
        "full_accuracy": full_accuracy,
        "accuracy_drop": full_accuracy - accuracy,
        "flops_ratio": flops / costs.full,
    }
