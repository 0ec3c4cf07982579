"""The held-out data that calibration and profiling read: batches on the model's device, and
every exit's logits over all of it."""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .._inputs import placement
from .._losses import check_targets
from ._progress import progress

if TYPE_CHECKING:
    from ._model import EarlyExitModel

Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]


def device_of(model: nn.Module) -> torch.device:
    return placement(model).get("device", torch.device("cpu"))


def batches(data: Data, device: torch.device, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, targets)`` batches on ``device`` from a pair of tensors or an iterable."""
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    if pair and all(isinstance(t, torch.Tensor) for t in data):
        images, targets = data
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        pairs: Iterable = zip(images.split(size), targets.split(size))
    else:
        pairs = data
    for batch in pairs:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("data must be (images, targets) tensors or an iterable of such batches")
        yield batch[0].to(device), batch[1].to(device)


def first_images(data: Data, device: torch.device, count: int) -> torch.Tensor:
    taken, total = [], 0
    for images, _ in batches(data, device):
        taken.append(images[: count - total])
        total += taken[-1].shape[0]
        if total >= count:
            break
    if not taken:
        raise ValueError("data is empty")
    return torch.cat(taken)


def batch_count(data: Data, size: int = 256) -> int | None:
    """How many batches :func:`batches` yields, where that is known without iterating."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return -(-data[0].shape[0] // size)
    return len(data) if hasattr(data, "__len__") else None


def collect(
    exits: EarlyExitModel, data: Data, show_progress: bool | None = None, desc: str = "exit logits"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits (on the CPU, float32) and the targets, over all of ``data``."""
    per_exit: list[list[torch.Tensor]] = [[] for _ in range(len(exits.heads) + 1)]
    targets = []
    pairs = progress(batches(data, device_of(exits.model)), show_progress, desc, "batch", batch_count(data))
    with torch.inference_mode():
        for images, labels in pairs:
            for store, logits in zip(per_exit, exits.exit_logits(images)):
                store.append(logits.float().cpu())
            targets.append(labels.cpu())
    logits, labels = [torch.cat(z) for z in per_exit], torch.cat(targets)
    if labels.is_floating_point():
        raise TypeError(
            f"targets are {labels.dtype}; accuracy needs class indices (an integer tensor): pass "
            "targets.argmax(1) for class probabilities"
        )
    check_targets(labels, logits[-1].shape[0], logits[-1].shape[1], check_range=True)
    return logits, labels
