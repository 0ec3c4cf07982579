"""The map-sized work of a channel gate built on average- and max-pooled descriptors.

``x * gate(avg(x), max(x))`` reads the map to pool it and again to gate it; everything in
between works on ``(N, C)`` numbers. Written as plain autograd, the max adds more: adaptive max
pooling (a slow, uncoalesced kernel on CUDA for a 1x1 output), a backward that zero-fills a
full-size gradient and scatters into it, and extra full-size adds where autograd sums the
gradients that reach ``x`` by three paths. This module keeps the map passes at the floor that
timm's SE has, plus the max's read and a scatter of ``N x C`` values:

- :func:`avg_max_pool` pools with one mean and one max-with-argmax reduction and has a pointwise
  backward. It is the form for ``torch.compile``: inductor reads the map once for both
  reductions and folds the backward into the gate's, the same passes as SE.
- :func:`pooled_gate` is the whole gate for eager training, as two autograd functions around
  the gate network, which stays in the ordinary graph. The gating multiply's backward computes
  the gate's gradient and leaves ``grad_out`` for the pooling's backward, which autograd runs
  after the gate network's; that one writes ``grad_x = grad_out * gate + d_avg / (H*W)`` and
  adds ``d_max`` at each argmax, so nothing full-size is summed afterwards.

The gradient of the max goes to the first maximal position in row-major order, as with
``adaptive_max_pool2d``; ties (a channel that is all zero after a ReLU, say) are common in
networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["avg_max_pool", "pooled_gate", "spatial_max"]


def _cpu_kernels(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CPU's choice where the fastest kernel differs by device. The
    other devices' formulas are plain PyTorch too, and tests run them on the CPU by patching
    this."""
    return t.device.type == "cpu"


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def spatial_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over ``H x W`` of ``(N, C, H, W)`` and the flat ``h * W + w`` index of its first
    occurrence, both ``(N, C)``, without copying the map.

    Each memory layout gets the reduction that reads it in order: for channels-last maps the CPU's
    max pooling (one window over the whole map) runs across channels with vector instructions,
    10-20 times faster there than a max over dim (``benchmarks/spatial_max.py``); elsewhere a
    max over the flattened spatial axis.
    """
    n, c, h, w = x.shape
    if _is_channels_last(x):
        if _cpu_kernels(x):
            peak, index = F.max_pool2d(x, (h, w), return_indices=True)
            return peak.view(n, c), index.view(n, c)
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c).max(1)  # a view in this layout
    return x.reshape(n, c, h * w).max(2)


def _add_at_argmax(dense: torch.Tensor, index: torch.Tensor, peak_grad: torch.Tensor) -> torch.Tensor:
    """Add ``peak_grad`` (N, C) into the full-size gradient ``dense`` at each channel's argmax.

    ``index`` counts positions in row-major ``(H, W)`` order whatever the memory layout, so the
    scatter goes through a view of ``dense`` in its own layout.
    """
    n, c, h, w = dense.shape
    if _is_channels_last(dense):
        flat, dim = dense.permute(0, 2, 3, 1).view(n, h * w, c), 1
    else:
        dense = dense.contiguous()
        flat, dim = dense.view(n, c, h * w), 2
    flat.scatter_add_(dim, index.unsqueeze(dim), peak_grad.unsqueeze(dim).to(dense.dtype))
    return dense


def _avg_max_with_index(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(N, 2, C)`` average and max of each channel, and the max's flat index ``(N, C)``."""
    peak, index = spatial_max(x)
    return torch.stack((x.mean((2, 3)), peak), dim=1), index


class _AvgMaxPool(torch.autograd.Function):
    """``(N, C, H, W) -> (N, 2, C)``: the average and the max of each channel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        pooled, index = _avg_max_with_index(x)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return pooled

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Pointwise, not a scatter: compiled, this fuses with the gate's backward into one pass.
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        positions = torch.arange(h * w, device=index.device).view(h, w)
        at_max = positions == index.view(n, c, 1, 1)
        avg_grad, max_grad = (g.view(n, c, 1, 1) for g in grad.unbind(1))
        return torch.where(at_max, max_grad, 0.0) + avg_grad / (h * w)


def avg_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Average and max of each channel of ``(N, C, H, W)`` as ``(N, 2, C)``.

    Traceable by ``torch.compile`` (fullgraph); inductor fuses the two reductions into one
    read of the map.
    """
    return _AvgMaxPool.apply(x)


GateFn = Callable[[torch.Tensor], torch.Tensor]


class _Handoff:
    """What the gating multiply's backward leaves for the pooling's backward: ``grad_out``, the
    gate and a full-size buffer to write the map's gradient into."""

    __slots__ = ("grad_out", "gate", "buffer")

    def __init__(self) -> None:
        self.grad_out = self.gate = self.buffer = None


class _PoolForGate(torch.autograd.Function):
    """``(N, C, H, W) -> (N, 2, C)`` average and max; its backward returns the map's whole
    gradient, the gating multiply's part included (left in the handoff by :class:`_Gate`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, handoff: _Handoff) -> torch.Tensor:
        pooled, index = _avg_max_with_index(x)
        ctx.save_for_backward(index)
        ctx.handoff = handoff
        return pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, pooled_grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        handoff = ctx.handoff
        if handoff.grad_out is None:  # the gate's backward always runs first: the gate reads the pool
            raise RuntimeError("ACAM's pooling was differentiated without its gating multiply")
        grad_out, gate, buffer = handoff.grad_out, handoff.gate, handoff.buffer
        handoff.grad_out = handoff.gate = handoff.buffer = None
        grad_x = _gated_grad_plus_spread_average(grad_out, gate, pooled_grad[:, 0], buffer)
        return _add_at_argmax(grad_x, index, pooled_grad[:, 1]), None


class _Gate(torch.autograd.Function):
    """``x * gate``; the gradient for ``x`` is left to :class:`_PoolForGate`, which adds the
    pooling's part to it in the same pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, handoff: _Handoff) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        ctx.handoff = handoff
        return x * gate[:, :, None, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        x, gate = ctx.saved_tensors
        needs_x, needs_gate, _ = ctx.needs_input_grad
        if not needs_gate:  # nothing reaches the pooling (a gate_fn that detaches): x's gradient is here
            return grad_out * gate[:, :, None, None] if needs_x else None, None, None
        # d(loss)/d(gate) reduces as soon as it multiplies; its full-size product becomes the
        # buffer of the map's gradient (one fresh allocation instead of two: on the CPU a fresh
        # one is also page-faulted in).
        buffer = grad_out * x
        gate_grad = buffer.sum((2, 3)).to(gate.dtype)
        if needs_x:
            ctx.handoff.grad_out, ctx.handoff.gate, ctx.handoff.buffer = grad_out, gate, buffer
        return None, gate_grad, None


def pooled_gate(x: torch.Tensor, gate_fn: GateFn) -> torch.Tensor:
    """``x * gate_fn(avg_max(x))[:, :, None, None]`` with one backward pass for the map
    (first-order gradients only).

    ``gate_fn`` maps the ``(N, 2, C)`` average and max descriptors to an ``(N, C)`` gate in
    ``x``'s dtype; it runs under ordinary autograd in the same graph, so its parameters, autocast
    and checkpointing behave as anywhere else. The map's gradient, ``grad_out * gate + d_avg /
    (H*W)`` plus ``d_max`` at each argmax, is written once by the pooling's backward, which
    autograd runs after the gate's backward and the gate network's.
    """
    handoff = _Handoff()
    gate = gate_fn(_PoolForGate.apply(x, handoff))
    return _Gate.apply(x, gate, handoff)


def _gated_grad_plus_spread_average(
    grad_out: torch.Tensor, gate: torch.Tensor, avg_grad: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``grad_out * gate + d_avg / (H*W)`` written into ``out`` (a full-size buffer of
    ``grad_out``'s shape and dtype), in one pass where the device broadcasts well.

    On CUDA ``addcmul`` is one kernel; on the CPU, kernels with two broadcast operands leave
    their vector path, and a multiply then an in-place add is about twice as fast.
    """
    n, c, h, w = out.shape
    gate4 = gate.view(n, c, 1, 1)
    spread = (avg_grad / (h * w)).to(grad_out.dtype).view(n, c, 1, 1)
    if _cpu_kernels(grad_out):
        return torch.mul(grad_out, gate4, out=out).add_(spread)
    return torch.addcmul(spread, grad_out, gate4, out=out)
