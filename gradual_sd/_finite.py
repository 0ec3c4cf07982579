"""Check a training step's values without stalling the accelerator's queue.

Reading a CUDA tensor on the host (``bool(t)``, ``t.item()``) waits for every kernel queued
before it, so a per-step check serialises the CPU with the GPU. Here the step's flags (one per
loss term, head logits and head features, plus any extra condition such as the targets' range)
are computed on the device in one stacked tensor and copied to pinned host memory without
blocking; a CUDA event says when the copy has landed, and the check reads it then, at a later
step. On the CPU the flags are read at once, which costs nothing. The error names the step and
every culprit either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch


class _Pending:
    def __init__(
        self,
        step: int,
        flags: torch.Tensor,
        labels: Callable[[], list[str]],
        ready: Callable[[], bool],
        num_values: int,
    ) -> None:
        self.step, self.flags, self.labels, self.ready = step, flags, labels, ready
        self.num_values = num_values  # the first flags are finiteness, the rest conditions


class FiniteCheck:
    """Collects per-step finiteness flags and raises ``FloatingPointError`` for a bad step.

    Args:
        deferred: Read the flags when they have reached the host instead of at once. Default:
            on CUDA only. A deferred failure surfaces at a later :meth:`submit` (usually the
            next step) or at :meth:`flush`.
    """

    def __init__(self, deferred: bool | None = None) -> None:
        self.deferred = deferred
        self.step = 0
        self._pending: deque[_Pending] = deque()

    def submit(
        self,
        values: Sequence[torch.Tensor],
        labels: Callable[[], list[str]],
        conditions: Sequence[torch.Tensor] = (),
    ) -> None:
        """Check this step's ``values`` (each must be all finite; the first is the total, which is
        non-finite whenever a term is) and ``conditions`` (0-dim booleans that must be true),
        named in that order by ``labels()``, which is called only to report."""
        step, self.step = self.step, self.step + 1
        deferred = values[0].device.type == "cuda" if self.deferred is None else self.deferred

        def stacked() -> torch.Tensor:
            return torch.stack([*(torch.isfinite(v.detach()).all() for v in values), *conditions])

        if not deferred:
            # The total alone first; the details only when something is wrong.
            if not (bool(torch.isfinite(values[0]).all()) and all(bool(c) for c in conditions)):
                self._raise_if_bad(_Pending(step, stacked(), labels, lambda: True, len(values)))
            return
        flags = stacked()
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append(_Pending(step, host, labels, event.query, len(values)))
        else:
            self._pending.append(_Pending(step, flags, labels, lambda: True, len(values)))
        # Earlier steps only: this step's copy has only just been queued.
        while len(self._pending) > 1 and self._pending[0].ready():
            self._raise_if_bad(self._pending.popleft())

    def flush(self) -> None:
        """Wait for and check every pending step (at the end of an epoch, before saving)."""
        while self._pending:
            pending = self._pending.popleft()
            while not pending.ready():
                torch.cuda.synchronize()
            self._raise_if_bad(pending)

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickling for a checkpoint) starts with nothing pending: CUDA events
        # and pinned buffers belong to the original's steps, which the original still checks.
        return {**self.__dict__, "_pending": deque()}

    def _raise_if_bad(self, pending: _Pending) -> None:
        flags = pending.flags.tolist()
        if all(flags):
            return
        self._pending.clear()
        bad = [label for label, ok in zip(pending.labels(), flags) if not ok]
        if all(flags[: pending.num_values]):  # only a condition failed, such as the targets' range
            raise ValueError(f"bad inputs at training step {pending.step}: {', '.join(bad)}")
        raise FloatingPointError(f"non-finite values at training step {pending.step}: {', '.join(bad)}")
