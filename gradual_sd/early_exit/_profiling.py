"""The per-exit report at the current thresholds: shares, accuracy, calibration, FLOPs and
measured latency relative to the plain model."""

from __future__ import annotations

import math
import statistics
import time
from functools import partial
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._policy import expected_calibration_error, route
from ._calibration import check_levels, curve, outcomes
from ._data import Data, device_of, first_images
from ._progress import progress

if TYPE_CHECKING:
    from ._model import EarlyExitModel


def profile(
    exits: EarlyExitModel,
    data: Data,
    batch_sizes: Sequence[int],
    repeats: int,
    latency_images: int,
    levels: Sequence[float],
    show_progress: bool | None,
) -> dict[str, Any]:
    """:meth:`EarlyExitModel.profile`'s report."""
    check_levels(levels)
    found = outcomes(exits, data, show_progress, "profile: exit logits")
    logits, targets, confidence, _, costs, _ = found
    device = device_of(exits.model)
    chosen_exit = route(confidence, exits.thresholds)
    per_exit_flops = costs.per_exit(exits.thresholds)
    names = [*exits.stage_names, exits.classifier_name]
    rows = []
    for k, name in enumerate(names):
        mine = chosen_exit == k
        probs = F.softmax(logits[k][mine], -1)
        rows.append(
            {
                "exit": name,
                "threshold": exits.thresholds[k] if k < len(exits.heads) else None,
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
    images = first_images(data, device, max(latency_images, *batch_sizes))
    latency = {
        b: measure_latency(exits, images, b, repeats, latency_images, show_progress) for b in batch_sizes
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
        variants[f"exit {k}"] = partial(exits._forced, exit=k)
    times: dict[str, list[float]] = {name: [] for name in variants}
    device = images.device
    # With one CPU thread, the process's CPU time is the work done, whatever else the
    # machine runs; otherwise (more threads, CUDA) only wall time measures it.
    one_thread_cpu = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if one_thread_cpu else time.perf_counter
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn(chunks[0])
        for rep in progress(range(repeats), show_progress, f"profile: latency at batch {batch}", "repeat"):
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
