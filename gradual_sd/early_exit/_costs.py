"""FLOPs per sample of the backbone up to each tapped stage, of each head and of the whole model."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._policy import ExitCosts
from ._routing import Route, everybody

if TYPE_CHECKING:
    from ._model import EarlyExitModel


def flops(fn: Callable[..., object], *args: object) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters that do not require gradients for the block: the FLOP counter's module
    tracker hooks the gradient of every module input that requires one, which fails for a
    parameter passed as an input (PiT's class token) without autograd."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def exit_costs(exits: EarlyExitModel, example: torch.Tensor) -> ExitCosts:
    """Counted on the first sample of ``example``: the backbone alone is the forward stopped
    right after stage ``k``; head ``k`` is the forward with only that head enabled, minus that."""
    example = example[:1]
    heads = len(exits.heads)
    with torch.inference_mode(), _frozen(exits):
        full = flops(exits.model, example)
        stages, head_costs = [], []
        for k in range(heads):
            backbone = Route(1, example.device, [False] * heads, everybody, stop_at=k)
            stages.append(flops(exits.run, example, backbone))
            head = Route(1, example.device, [j == k for j in range(heads)], everybody)
            head_costs.append(flops(exits.run, example, head) - stages[-1])
    return ExitCosts(tuple(stages), tuple(head_costs), full)
