"""One forward pass through the exits: which samples are still running, which left where."""

from __future__ import annotations

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


class Pass:
    """One forward pass through the exits: who is still in, and who left where.

    ``leave(k, head_logits)`` decides which of the remaining samples leave at stage ``k``; it
    is only called for heads in ``active`` (the others are not run). ``stop_at`` ends the
    forward right after that stage, before its head (to measure the backbone's cost alone).
    ``record`` collects every active head's logits.
    """

    def __init__(
        self,
        batch: int,
        device: torch.device,
        active: Sequence[bool],
        leave: Callable[[int, torch.Tensor], torch.Tensor],
        stop_at: int | None = None,
        record: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.remaining = torch.arange(batch, device=device)
        self.active, self.leave, self.stop_at, self.record = active, leave, stop_at, record
        self.fired: list[int] = []
        self.left: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (exit, indices, logits)

    def result(self, logits: torch.Tensor | None, batch: int, final_exit: int) -> ExitOutput:
        """Scatter every exit's logits back to the input order."""
        parts = list(self.left)
        if logits is not None:
            parts.append((final_exit, self.remaining, logits))
        indices = torch.cat([p[1] for p in parts])
        values = torch.cat([p[2] for p in parts])  # promotes, e.g. float16 heads under autocast
        exits = torch.cat([torch.full_like(p[1], p[0]) for p in parts])
        out = values.new_empty((batch, values.shape[1]))
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
