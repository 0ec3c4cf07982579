"""Which exit answers each sample, what that costs, and how to choose the thresholds.

Pure tensor functions over precomputed head outputs, used by :class:`EarlyExitModel` to
calibrate and profile. A sample leaves at the first auxiliary head whose top softmax
probability reaches that head's threshold; a threshold above 1 (``math.inf``) disables the
head (it is not run); samples that no head takes reach the model's own classifier, the last exit.
"""

from __future__ import annotations

import math
from typing import NamedTuple
from collections.abc import Callable, Sequence

import torch

from .._exit_thresholds import is_enabled, percent_hint


class ExitCosts(NamedTuple):
    """Per-sample cost (FLOPs) of the parts of an early-exit model.

    Attributes:
        stages: Backbone cost from the input up to and including each tapped stage.
        heads: Cost of each auxiliary head on its stage's output.
        full: Cost of the whole model (the last exit), heads excluded.
    """

    stages: tuple[float, ...]
    heads: tuple[float, ...]
    full: float

    def per_exit(self, thresholds: Sequence[float]) -> torch.Tensor:
        """Cost of answering at each exit (auxiliary heads, then the classifier): the backbone up
        to it, every enabled head run on the way, and its own head, enabled or not (a sample
        forced to leave at a disabled exit runs that head, as the trade-off curve counts it)."""
        enabled = torch.tensor(
            [h if is_enabled(t) else 0.0 for h, t in zip(self.heads, thresholds)], dtype=torch.float64
        )
        before = enabled.cumsum(0) - enabled
        own = torch.tensor(self.heads, dtype=torch.float64)
        stages = torch.tensor(self.stages, dtype=torch.float64)
        full = torch.tensor([self.full], dtype=torch.float64)
        return torch.cat([stages + before + own, full + enabled.sum()])


def route(confidence: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Exit index of every sample: the first head ``k`` with ``confidence[k] >= thresholds[k]``,
    else ``len(thresholds)`` (the model's classifier). ``confidence`` is ``(heads, N)``."""
    limits = torch.tensor(list(thresholds), dtype=confidence.dtype, device=confidence.device)
    takes = confidence >= limits[:, None]
    takes = torch.cat([takes, takes.new_ones(1, takes.shape[1])])
    return takes.to(torch.uint8).argmax(0)  # argmax returns the first of equal maxima


def evaluate(
    confidence: torch.Tensor, correct: torch.Tensor, costs: ExitCosts, thresholds: Sequence[float]
) -> tuple[float, float]:
    """(accuracy, mean cost per sample) of ``thresholds``, simulated from every exit's
    ``confidence`` ``(heads, N)`` and ``correct`` ``(heads + 1, N)``."""
    exits = route(confidence, thresholds)
    samples = torch.arange(exits.numel(), device=exits.device)
    accuracy = correct[exits, samples].double().mean().item()
    cost = costs.per_exit(thresholds)[exits.cpu()].mean().item()
    return accuracy, cost


def _candidates(values: torch.Tensor, limit: int) -> list[float]:
    """Thresholds worth trying for one head: its distinct confidences (at most ``limit``,
    evenly spread in rank) and "disabled"."""
    distinct = values.unique()
    if distinct.numel() > limit:
        distinct = distinct[torch.linspace(0, distinct.numel() - 1, limit).round().long()]
    return [*distinct.tolist(), math.inf]


def choose_thresholds(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    costs: ExitCosts,
    max_accuracy_drop: float = 0.005,
    max_candidates: int = 256,
    max_rounds: int = 20,
) -> list[float]:
    """Thresholds that minimise the mean cost while keeping the accuracy lost against the
    model's own classifier on the same data within ``max_accuracy_drop`` (a fraction in
    ``[0, 1]``: 0.005 is half a point; 5 is refused, naming the 0.05 meant). The constraint is
    checked on the calibration data only: on a few hundred samples the chosen thresholds can fit
    its noise, and lose more on new data.

    Coordinate descent: start with every head disabled (the full model, which meets the
    constraint), then visit the heads shallow to deep, setting each one's threshold to the
    candidate (one of its observed confidences, or disabled) with the lowest mean cost among those
    that keep the constraint, the others fixed; repeat until a round changes nothing. Ties go to
    the higher accuracy, then to the higher threshold. Each step keeps the constraint and never
    raises the cost, so it ends; the result is a local optimum of the candidate grid (exact for
    one head), not always the global one.

    Args:
        confidence: ``(heads, N)`` top softmax probability of every auxiliary head.
        correct: ``(heads + 1, N)`` bool, whether each exit (the classifier last) is right.
        costs: The model's :class:`ExitCosts`.
    """
    heads = confidence.shape[0]
    _check_shapes(confidence, correct, costs)
    check_fraction("max_accuracy_drop", max_accuracy_drop)
    floor = correct[heads].double().mean().item() - max_accuracy_drop - 1e-12

    def key(trial: list[float]) -> tuple | None:
        """What the search minimises, or ``None`` below the accuracy floor."""
        accuracy, cost = evaluate(confidence, correct, costs, trial)
        return None if accuracy < floor else (cost, -accuracy, [-t for t in trial])

    options = [_candidates(confidence[k], max_candidates) for k in range(heads)]
    return _coordinate_descent([math.inf] * heads, options, key, max_rounds)


def choose_thresholds_within_cost(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    costs: ExitCosts,
    max_cost: float,
    max_candidates: int = 256,
    max_rounds: int = 20,
    levels: int = 101,
) -> list[float]:
    """Thresholds with the best accuracy whose mean cost is at most ``max_cost`` times the
    model's own (``costs.full``): a compute budget, as a deployment states it.

    The search starts from the best single threshold shared by every head (``levels`` levels
    spread over the observed confidences, 0 included), then refines one head at a time as
    :func:`choose_thresholds` does, keeping the budget; ties go to the lower cost, then to the
    higher threshold. Checked on the calibration data only.

    Raises:
        ValueError: if ``max_cost`` is not in ``(0, 1]`` (50 for half is refused, naming 0.5), or
            below the cheapest answer (every sample at the first head).
    """
    heads = confidence.shape[0]
    _check_shapes(confidence, correct, costs)
    check_fraction("max_cost", max_cost)
    budget = max_cost * costs.full * (1 + 1e-12)
    cheapest = evaluate(confidence, correct, costs, [0.0] * heads)[1] / costs.full
    if cheapest * costs.full > budget:
        raise ValueError(
            f"max_cost={max_cost} is below the cheapest answer, {cheapest:.4f} of the model's FLOPs "
            "(every sample at the first head); allow at least that"
        )

    def key(trial: list[float]) -> tuple | None:
        """What the search minimises, or ``None`` over the budget."""
        accuracy, cost = evaluate(confidence, correct, costs, trial)
        return None if cost > budget else (-accuracy, cost, [-t for t in trial])

    thresholds = [0.0] * heads
    best = key(thresholds)
    quantiles = torch.linspace(0, 1, levels, dtype=torch.float64)
    for level in torch.quantile(confidence.flatten().double(), quantiles).tolist():
        found = key([level] * heads)
        if found is not None and found < best:
            thresholds, best = [level] * heads, found
    options = [_candidates(confidence[k], max_candidates) for k in range(heads)]
    return _coordinate_descent(thresholds, options, key, max_rounds)


def _coordinate_descent(
    thresholds: list[float],
    options: list[list[float]],
    key: Callable[[list[float]], tuple | None],
    max_rounds: int,
) -> list[float]:
    """Visit the heads shallow to deep, moving each one's threshold to the option with the
    smallest ``key`` (``None``: not allowed), the others fixed; repeat until a round changes
    nothing. ``thresholds`` must be allowed; every step keeps that and lowers ``key``."""
    best = key(thresholds)
    for _ in range(max_rounds):
        changed = False
        for k in range(len(thresholds)):
            for value in options[k]:
                trial = [*thresholds[:k], value, *thresholds[k + 1 :]]
                found = key(trial)
                if found is not None and found < best:
                    thresholds, best, changed = trial, found, True
        if not changed:
            break
    return thresholds


# The calibration targets: each a fraction, its range and what it is a fraction of.
_FRACTIONS = {
    "max_accuracy_drop": ("[0, 1]", "of accuracy against the model's own classifier (0.005: half a point)"),
    "max_cost": ("(0, 1]", "of the model's FLOPs (0.5: half)"),
}


def check_fraction(name: str, value: float) -> None:
    """Refuse a calibration target outside its range (:data:`_FRACTIONS`), naming the value, the
    range and, for a percentage (50 for 0.5), the fraction meant."""
    interval, meaning = _FRACTIONS[name]
    low_open = interval.startswith("(")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not ((0 < value) if low_open else (0 <= value)) or not value <= 1:
        raise ValueError(
            f"{name}={value!r} is not a fraction in {interval} ({meaning}){percent_hint(name, value)}"
        )


def _check_shapes(confidence: torch.Tensor, correct: torch.Tensor, costs: ExitCosts) -> None:
    heads, samples = confidence.shape
    if correct.shape != (heads + 1, samples):
        raise ValueError(
            f"correct must be (heads + 1, N) = {(heads + 1, samples)}, got {tuple(correct.shape)}"
        )
    if len(costs.heads) != heads or len(costs.stages) != heads:
        raise ValueError(f"costs describe {len(costs.heads)} heads, confidence has {heads}")


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of softmax probabilities ``(N, C)``: the sample-weighted mean
    gap between accuracy and mean confidence over ``bins`` equal-width confidence bins."""
    if probs.numel() == 0:
        return math.nan
    confidence, predicted = probs.max(1)
    correct = (predicted == targets).double()
    which = (confidence.double() * bins).ceil().clamp(1, bins).long() - 1
    gap = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    gap.index_add_(0, which, confidence.double() - correct)
    return (gap.abs().sum() / probs.shape[0]).item()
