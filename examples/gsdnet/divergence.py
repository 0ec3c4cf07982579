"""When a run has diverged and must stop before its checkpoint is overwritten.

The rule: after every epoch, every parameter and buffer must be finite, and the epoch's mean
training loss must stay below ``DIVERGENCE_FACTOR`` times the loss of the run's first step (the
untrained model's, averaged over processes), or times 1 where that first loss is below 1 (a
model that starts near zero loss must not be stopped by ordinary noise). A healthy run's loss
falls below its first step's within the first epoch; one that ends an epoch ten times above it
has been thrown off by too large a learning rate (``--lr 10`` on digits ends its first epoch at
1e4 and more), and its weights would be saved, evaluated at chance accuracy and reported as a
normal epoch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistEnv, all_reduce

DIVERGENCE_FACTOR = 10.0
LOSS_FLOOR = 1.0


class DivergedError(FloatingPointError):
    """Training stopped on non-finite weights or a runaway loss; the last good checkpoint was kept."""


def check_weights(module: nn.Module, env: DistEnv, epoch: int, kept: str) -> None:
    """Raise :class:`DivergedError` naming the tensors when any weight or buffer is not finite
    (on any process; one device sync per epoch)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    flags = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).float()
    all_reduce(flags, env, op=dist.ReduceOp.MIN)
    if bool(flags.all()):
        return
    names = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    bad = [name for name, ok in zip(names, flags.tolist()) if not ok]
    raise DivergedError(
        f"the weights are not finite after epoch {epoch} ({len(bad)} tensors, e.g. {bad[:3]}); "
        f"stopping without saving them. {kept}"
    )


def check_loss(loss: float, first_step_loss: float | None, epoch: int, kept: str) -> None:
    """Raise :class:`DivergedError` when ``loss`` (an epoch's mean) broke the rule above."""
    if first_step_loss is None or loss < DIVERGENCE_FACTOR * max(first_step_loss, LOSS_FLOOR):
        return
    raise DivergedError(
        f"training diverged: epoch {epoch}'s mean loss {loss:.4g} is more than "
        f"{DIVERGENCE_FACTOR:g} x the first step's {first_step_loss:.4g}; stopping without saving "
        f"this epoch. {kept}"
    )
