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
- :class:`FusedPooledGate` is the whole gate as one autograd function: its backward computes
  ``grad_x = grad_out * gate + d_avg / (H*W)`` and adds ``d_max`` at each argmax, so nothing
  full-size is summed afterwards. The small gate network is re-run under ordinary autograd
  inside the backward (a few ``N x C`` operations) to get ``d_avg``, ``d_max`` and its
  parameters' gradients.

The gradient of the max goes to the first maximal position in row-major order, as with
``adaptive_max_pool2d``; ties (a channel that is all zero after a ReLU, say) are common in
networks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["avg_max_pool", "FusedPooledGate", "spatial_max"]


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def spatial_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over ``H x W`` of ``(N, C, H, W)`` and the flat ``h * W + w`` index of its first
    occurrence, both ``(N, C)``, without copying the map.

    Each memory layout gets the reduction that reads it in order: for channels-last maps the CPU's
    adaptive max pool runs across channels with vector instructions (there it is about five
    times faster than a max over dim), elsewhere a max over the flattened spatial axis.
    """
    n, c, h, w = x.shape
    if _is_channels_last(x):
        if x.device.type == "cpu":
            peak, index = F.adaptive_max_pool2d(x, 1, return_indices=True)
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


class _AvgMaxPool(torch.autograd.Function):
    """``(N, C, H, W) -> (N, 2, C)``: the average and the max of each channel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        peak, index = spatial_max(x)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return torch.stack((x.mean((2, 3)), peak), dim=1)

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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, AttributeError):  # torch < 2.4 has per-device functions
        if device_type == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return dtype if enabled else None


GateFn = Callable[[torch.Tensor], torch.Tensor]


class FusedPooledGate(torch.autograd.Function):
    """``x * gate_fn(avg_max(x))`` with one backward for the map (first-order gradients).

    ``gate_fn`` maps the ``(N, 2, C)`` descriptors to an ``(N, C)`` gate in ``x``'s dtype using
    only ``params``, which are passed so that their gradients come back through this function
    (and DDP's hooks see them as usual).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_fn: GateFn, *params: nn.Parameter) -> torch.Tensor:
        peak, index = spatial_max(x)
        pooled = torch.stack((x.mean((2, 3)), peak), dim=1)
        gate = gate_fn(pooled)
        ctx.gate_fn, ctx.params = gate_fn, params
        ctx.autocast_dtype = _autocast_dtype(x.device.type)
        ctx.save_for_backward(x, pooled, index, gate)
        return x * gate[:, :, None, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, pooled, index, gate = ctx.saved_tensors
        needs_x, _, *needs_params = ctx.needs_input_grad
        # d(loss)/d(gate): the gate is (N, C), so this reduces as soon as it multiplies. The
        # product's buffer is reused for the map's gradient below: one fresh full-size
        # allocation instead of two (on the CPU a fresh one is also page-faulted in).
        scratch = grad_out * x
        gate_grad = scratch.sum((2, 3)).to(gate.dtype)
        dtype = ctx.autocast_dtype
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()
        # Re-run rather than keep the forward's graph: a graph built inside this forward would
        # have its tensors packed by the caller's saved-tensor hooks (non-reentrant checkpoint
        # among them), which then recompute the region a second time when it is differentiated.
        with torch.enable_grad(), autocast:
            descriptors = pooled.detach().requires_grad_(needs_x)
            wanted = [descriptors] * needs_x + [p for p, need in zip(ctx.params, needs_params) if need]
            grads = list(torch.autograd.grad(ctx.gate_fn(descriptors), wanted, gate_grad, allow_unused=True))
        grad_x = None
        if needs_x:
            pooled_grad = grads.pop(0)
            grad_x = _gated_grad_plus_spread_average(grad_out, gate, pooled_grad[:, 0], scratch)
            grad_x = _add_at_argmax(grad_x, index, pooled_grad[:, 1])
        param_grads = iter(grads)
        return (grad_x, None, *(next(param_grads) if need else None for need in needs_params))


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
    if grad_out.device.type == "cpu":
        return torch.mul(grad_out, gate4, out=out).add_(spread)
    return torch.addcmul(spread, grad_out, gate4, out=out)
