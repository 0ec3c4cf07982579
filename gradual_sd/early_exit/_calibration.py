"""Calibration and reports: thresholds chosen, the accuracy-compute curve and the per-exit
report, all simulated from one full pass over held-out data (every exit's logits), and latency
measured with routes that force every sample out at one exit.

:class:`CalibrationMixin` gives :class:`~gradual_sd.EarlyExitModel` these methods; they reach
the model through its public methods only (``exit_logits``, ``run``, ``set_thresholds``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from .._exit_thresholds import is_enabled, is_threshold, percent_hint
from ._costs import exit_costs
from ._data import Data, collect, device_of, first_images
from ._policy import (
    ExitCosts,
    check_fraction,
    choose_thresholds,
    choose_thresholds_within_cost,
    evaluate,
    expected_calibration_error,
    route,
)
from ._progress import progress as progress_bar
from ._routing import ExitOutput, Route

if TYPE_CHECKING:
    from ._model import EarlyExitModel


class CalibrationMixin:
    """:class:`~gradual_sd.EarlyExitModel`'s calibration and reports."""

    def exit_costs(self: EarlyExitModel, example: torch.Tensor) -> ExitCosts:
        """FLOPs per sample of the backbone up to each stage, of each head and of the whole model,
        counted with ``torch.utils.flop_counter`` on ``example`` (one sample). That counter counts
        matrix multiplications and convolutions, not element-wise operations."""
        return exit_costs(self, example)

    def calibrate(
        self: EarlyExitModel,
        data: Data,
        max_accuracy_drop: float | None = None,
        *,
        max_cost: float | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Choose the thresholds on held-out ``data`` (an ``(images, targets)`` pair or an
        iterable of such batches), for one of two targets:

        - ``max_accuracy_drop`` (default 0.005 when neither is given): the lowest expected FLOPs
          whose accuracy stays within that fraction of the model's own classifier;
        - ``max_cost``: the best accuracy at or under that mean cost, as a fraction of the
          model's FLOPs (0.5: half), as a deployment budget is stated.

        Every exit's logits come from one full pass over ``data``; the searches are
        :func:`~gradual_sd.early_exit.choose_thresholds` and
        :func:`~gradual_sd.early_exit.choose_thresholds_within_cost`. Sets and returns the
        thresholds with the accuracy, its drop and the relative FLOPs they reach on ``data``. On
        new data the result can be worse: on a few hundred images the thresholds fit the set's
        noise (docs/early-exit.md), so calibrate on as many held-out images as there are.
        Targets must be class indices of the classifier's classes.

        ``progress``: a bar over the batches of ``data`` (tqdm, when installed) on stderr;
        the default shows it only when stderr is a terminal, ``False`` never.
        """
        if max_accuracy_drop is not None and max_cost is not None:
            raise ValueError(
                f"pass max_accuracy_drop ({max_accuracy_drop}) or max_cost ({max_cost}), not both: "
                "one is the target, the other what it costs"
            )
        if max_cost is not None:
            check_fraction("max_cost", max_cost)  # before the pass over the data, not after
        drop = 0.005 if max_accuracy_drop is None else max_accuracy_drop
        check_fraction("max_accuracy_drop", drop)
        _, _, confidence, correct, costs, input_shape = outcomes(self, data, progress, "calibrate")
        if max_cost is not None:
            chosen = choose_thresholds_within_cost(confidence, correct, costs, max_cost)
        else:
            chosen = choose_thresholds(confidence, correct, costs, drop)
        self.set_thresholds(chosen)
        self.input_shape = input_shape  # the thresholds hold at this size: export_onnx's default
        accuracy, flops = evaluate(confidence, correct, costs, self.thresholds)
        full_accuracy = correct[-1].double().mean().item()
        return {
            "thresholds": list(self.thresholds),
            "accuracy": accuracy,
            "full_accuracy": full_accuracy,
            "accuracy_drop": full_accuracy - accuracy,
            "flops_ratio": flops / costs.full,
        }

    def tradeoff(
        self: EarlyExitModel,
        data: Data,
        levels: Sequence[float] = tuple(i / 20 for i in range(21)),
        *,
        progress: bool | None = None,
    ) -> list[dict[str, float]]:
        """The accuracy-compute curve on ``data``: for each level, every head at that threshold
        (simulated from one full pass), the accuracy and the mean FLOPs relative to the model's.
        Thresholds are not changed. :meth:`profile` returns the same curve. ``progress`` as in
        :meth:`calibrate`."""
        check_levels(levels)
        return curve(outcomes(self, data, progress, "tradeoff"), levels)

    def profile(
        self: EarlyExitModel,
        data: Data,
        *,
        batch_sizes: Sequence[int] = (1, 64),
        repeats: int = 5,
        latency_images: int = 64,
        levels: Sequence[float] = tuple(i / 20 for i in range(21)),
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Per exit, at the current thresholds: share of samples, their accuracy and expected
        calibration error, the head's accuracy on every sample, FLOPs per sample to reach it,
        and measured latency; overall: accuracy against the full model's, mean FLOPs and
        latency as ratios to the plain model.

        Latency is timed on the first ``latency_images`` images at each batch size (batch 1:
        one image at a time; a larger batch: as many whole batches as fit, at least one, since
        the exits' saving depends on which images a batch holds), the plain model and every
        variant in turn within each repetition;
        the ratios are medians over ``repeats`` repetitions of per-repetition ratios. On a CPU
        with one torch thread the clock is the process's CPU time, else wall time. Per exit,
        every sample is forced to leave there (the enabled heads before it still run).
        ``tradeoff`` is :meth:`tradeoff`'s curve at ``levels``, from the same pass over ``data``.
        ``progress``: bars over the pass over ``data`` and over the repetitions at each batch
        size, as in :meth:`calibrate`.
        """
        check_levels(levels)
        found = outcomes(self, data, progress, "profile: exit logits")
        logits, targets, confidence, _, costs, _ = found
        chosen_exit = route(confidence, self.thresholds)
        per_exit_flops = costs.per_exit(self.thresholds)
        names = [*self.stage_names, self.classifier_name]
        rows = []
        for k, name in enumerate(names):
            mine = chosen_exit == k
            probs = F.softmax(logits[k][mine], -1)
            rows.append(
                {
                    "exit": name,
                    "threshold": self.thresholds[k] if k < len(self.heads) else None,
                    "share": mine.double().mean().item(),
                    "accuracy": (probs.argmax(-1) == targets[mine]).double().mean().item()
                    if mine.any()
                    else math.nan,
                    "ece": expected_calibration_error(probs, targets[mine]),
                    "head_accuracy_all": (logits[k].argmax(-1) == targets).double().mean().item(),
                    "flops": per_exit_flops[k].item(),
                    "flops_ratio": per_exit_flops[k].item() / costs.full,
                }
            )
        chosen = torch.stack(logits)[chosen_exit, torch.arange(chosen_exit.numel())]
        images = first_images(data, device_of(self.model), max(latency_images, *batch_sizes))
        latency = {
            b: measure_latency(self, images, b, repeats, latency_images, progress) for b in batch_sizes
        }
        for k, row in enumerate(rows):
            row["latency_ratio"] = {b: latency[b][f"exit {k}"] for b in batch_sizes}
        return {
            "exits": rows,
            "accuracy": (chosen.argmax(-1) == targets).double().mean().item(),
            "full_accuracy": (logits[-1].argmax(-1) == targets).double().mean().item(),
            "flops": per_exit_flops[chosen_exit].mean().item(),
            "full_flops": costs.full,
            "flops_ratio": per_exit_flops[chosen_exit].mean().item() / costs.full,
            "latency_ratio": {b: latency[b]["exits"] for b in batch_sizes},
            "latency_ms_per_image": {b: latency[b]["ms"] for b in batch_sizes},
            "samples": int(targets.numel()),
            "tradeoff": curve(found, levels),
        }


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
    return Outcomes(logits, targets, confidence, correct, exits.exit_costs(first), tuple(first.shape[1:]))


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


def forced_exit(exits: EarlyExitModel, images: torch.Tensor, exit: int) -> ExitOutput:
    """Every sample answers at ``exit``; the enabled heads before it still run (as they would
    for a sample that exits there), for timing an exit."""
    active = [is_enabled(t) or k == exit for k, t in enumerate(exits.thresholds)]
    everyone = lambda k, z: torch.full((z.shape[0],), k == exit, device=z.device)  # noqa: E731
    forced = Route(images.shape[0], images.device, active, everyone)
    return forced.result(exits.run(images, forced))


def measure_latency(
    exits: EarlyExitModel,
    images: torch.Tensor,
    batch: int,
    repeats: int,
    count: int,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Median ratios to the plain model of the time per image of the exits (and of every
    forced exit), on ``count`` images at batch 1, or on the whole batches of ``batch`` that
    fit in ``count`` images (at least one)."""
    whole = max(batch, count - count % batch)
    chunks = list(images[:whole].split(batch))
    variants: dict[str, Callable[[torch.Tensor], object]] = {"plain": exits.model, "exits": exits}
    for k in range(len(exits.heads) + 1):
        variants[f"exit {k}"] = partial(forced_exit, exits, exit=k)
    times: dict[str, list[float]] = {name: [] for name in variants}
    device = images.device
    # With one CPU thread, the process's CPU time is the work done, whatever else the
    # machine runs; otherwise (more threads, CUDA) only wall time measures it.
    one_thread_cpu = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if one_thread_cpu else time.perf_counter
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn(chunks[0])
        for rep in progress_bar(
            range(repeats), show_progress, f"profile: latency at batch {batch}", "repeat"
        ):
            order = list(variants)[rep % len(variants) :] + list(variants)[: rep % len(variants)]
            for name in order:
                _synchronize(device)
                start = clock()
                for chunk in chunks:
                    variants[name](chunk)
                _synchronize(device)
                times[name].append(clock() - start)
    result: dict[str, Any] = {
        name: statistics.median(t / p for t, p in zip(times[name], times["plain"]))
        for name in variants
        if name != "plain"
    }
    images_timed = sum(chunk.shape[0] for chunk in chunks)
    result["ms"] = {name: 1000 * statistics.median(times[name]) / images_timed for name in ("plain", "exits")}
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
