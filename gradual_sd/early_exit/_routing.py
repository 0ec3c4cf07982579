"""One forward pass through the exits: which samples are still running, which left where."""

from __future__ import annotations

import math

from typing import NamedTuple
from collections.abc import Callable, Sequence

import torch


class ExitOutput(NamedTuple):
    """What :meth:`EarlyExitModel.forward` returns, in the input order.

    Attributes:
        logits: ``(N, num_classes)`` logits of the exit that answered each sample.
        exit_index: ``(N,)`` long: which exit answered, ``0..len(heads) - 1`` for the auxiliary
            heads (shallow to deep) and ``len(heads)`` for the model's own classifier.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor


class Stop(Exception):
    """Raised inside the model's forward when no sample is left to run the later stages."""


class Route:
    """What decides one pass through :meth:`EarlyExitModel.run <gradual_sd.EarlyExitModel.run>`,
    and what the pass did: who is still running, and who left where.

    Args:
        batch: The number of samples in the batch.
        device: The batch's device.
        active: One flag per head: whether the head runs (a head that does not run lets no
            sample leave).
        leave: ``leave(k, head_logits)`` returns, for the samples still running, a boolean
            mask of those that leave at head ``k``; called only for active heads.
        stop_at: End the forward right after that stage, before its head (to measure the
            backbone's cost alone).
        record: A dict that collects every active head's logits, by head index.

    Attributes:
        remaining: The indices of the samples still running.
        fired: The stages that ran, in the order they ran.
        left: For each head where samples left, ``(head, their indices, their logits)``.
    """

    def __init__(
        self,
        batch: int,
        device: torch.device | str,
        active: Sequence[bool],
        leave: Callable[[int, torch.Tensor], torch.Tensor],
        stop_at: int | None = None,
        record: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.batch = batch
        self.remaining = torch.arange(batch, device=device)
        self.active, self.leave, self.stop_at, self.record = active, leave, stop_at, record
        self.fired: list[int] = []
        self.left: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def result(self, logits: torch.Tensor | None) -> ExitOutput:
        """Every exit's logits scattered back to the input order: those of the samples that
        left, and ``logits``, those of the samples the model's classifier answered (the last
        exit, ``len(active)``)."""
        parts = list(self.left)
        if logits is not None:
            parts.append((len(self.active), self.remaining, logits))
        indices = torch.cat([p[1] for p in parts])
        values = torch.cat([p[2] for p in parts])  # promotes, e.g. float16 heads under autocast
        exits = torch.cat([torch.full_like(p[1], p[0]) for p in parts])
        out = values.new_empty((self.batch, values.shape[1]))
        out[indices] = values
        exit_index = torch.empty_like(exits)
        exit_index[indices] = exits
        return ExitOutput(out, exit_index)


def nobody(k: int, logits: torch.Tensor) -> torch.Tensor:
    """A ``leave`` rule: no sample leaves."""
    return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)


def everybody(k: int, logits: torch.Tensor) -> torch.Tensor:
    """A ``leave`` rule: every sample leaves."""
    return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)


def drop_samples(output: object, keep: torch.Tensor, batch: int) -> object:
    """``output`` with only the ``keep`` samples: every tensor whose first axis is the batch of
    ``batch`` is indexed, inside tuples and lists too (a stage's ``(x, extra)``); anything else
    (sizes, ``None``) is passed on as it is."""
    if isinstance(output, torch.Tensor):
        return output[keep] if output.dim() and output.shape[0] == batch else output
    if isinstance(output, (tuple, list)):
        dropped = [drop_samples(item, keep, batch) for item in output]
        if hasattr(output, "_fields"):  # a named tuple
            return type(output)(*dropped)
        return type(output)(dropped)
    return output


# How far logits computed another way (a smaller batch, the exported segments) may differ from
# the model's own before that way is refused: float32 kernels on other shapes round
# differently, not more.
TOLERANCE = 1e-4


def difference(got: torch.Tensor, expected: torch.Tensor) -> float | None:
    """The largest difference between ``got`` and ``expected`` where it is beyond
    :data:`TOLERANCE` of their scale (or the shapes differ: ``inf``); ``None`` where they agree."""
    if got.shape != expected.shape:
        return math.inf
    largest = float((got - expected).abs().max())
    return largest if largest > TOLERANCE * (float(expected.abs().max()) + 1.0) else None
