"""How ACAM runs fast: the map-sized work, the grouped products, and the choice of path.

Internal to :mod:`gradual_sd._attention`. ACAM computes ``x * gate(avg(x), max(x))``; a path is
the pair of operations around the gate network: ``pool`` (``(N, C, H, W) -> (N, 2, C)``) and
``multiply`` (the map times an ``(N, C)`` gate). :func:`gate_path` is the one place that
chooses:

- eager training: :class:`FusedPath`, whose backward writes the map's gradient in one pass;
- ``torch.compile``: :class:`CompiledPath`, a pool with a pointwise backward for inductor;
- no gradient: :class:`PlainPath`, the formula as written (no argmax).

All three give the same numbers. The gradient of the max goes to the first maximal position in
row-major order, as with ``adaptive_max_pool2d``. Why each path exists: ``docs/design.md``,
Attention.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class PlainPath:
    """The formula as written, for when no gradient is taken: no argmax is needed."""

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """``(N, 2, C)``: the average and the max of each channel."""
        return torch.stack((x.mean((2, 3)), x.amax((2, 3))), dim=1)

    @staticmethod
    def multiply(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x`` times the ``(N, C)`` gate, in ``x``'s dtype."""
        # CUDA autocast runs the gate network's sums in float32; without the cast the product
        # would promote the whole map (and every layer after it) to float32.
        return x * gate.to(x.dtype)[:, :, None, None]


class CompiledPath(PlainPath):
    """Under ``torch.compile``: a pool whose backward is pointwise, so inductor fuses it with the
    gate's backward and reads the map once for both reductions."""

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        return _AvgMaxPool.apply(x)


class FusedPath(PlainPath):
    """Eager training: two autograd functions around the gate network; one path per forward.

    In a first-order backward the multiply's leaves ``grad_out``, the gate and a full-size buffer
    here; the pool's, which autograd runs after the gate network's, writes the map's whole
    gradient ``grad_out * gate + d_avg / (H*W)`` (plus ``d_max`` at each argmax) into that buffer.
    """

    def __init__(self) -> None:
        self._left: tuple | None = None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return _PoolForGate.apply(x, self)

    def multiply(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return _Gate.apply(x, gate.to(x.dtype), self)

    def _leave(self, grad_out: torch.Tensor, gate: torch.Tensor, buffer: torch.Tensor) -> None:
        self._left = (torch._C._current_graph_task_id(), grad_out, gate, buffer)

    def _take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """What the multiply's backward left in this backward pass, or ``None``.

        A pass that differentiates only the parameters runs the multiply's backward but not the
        pool's; what it left must not reach a later pass (one through a graph of a gradient can
        run the pool's backward alone).
        """
        left, self._left = self._left, None
        if left is None or left[0] != torch._C._current_graph_task_id():
            return None
        return left[1:]


_PLAIN, _COMPILED = PlainPath(), CompiledPath()


def gate_path(x: torch.Tensor, parameters: Iterable[nn.Parameter]) -> PlainPath:
    """The path for gating ``x`` with a gate network that has ``parameters``."""
    if torch.compiler.is_compiling():
        return _COMPILED
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in parameters)):
        return FusedPath()
    return _PLAIN


def _cpu_kernels(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CPU's choice where the fastest kernel differs by device. The
    other devices' formulas are plain PyTorch too, and tests run them on the CPU by patching
    this."""
    return t.device.type == "cpu"


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def spatial_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over ``H x W`` and the flat ``h * W + w`` index of its first occurrence, without
    copying the map.

    Each layout gets the reduction that reads it in order; for channels-last maps on the CPU,
    max pooling with one window over the whole map is the vectorised kernel
    (``benchmarks/spatial_max.py`` times the candidates).

    Args:
        x: An ``(N, C, H, W)`` map.

    Returns:
        The ``(N, C)`` maxima and their ``(N, C)`` indices.
    """
    n, c, h, w = x.shape
    if _is_channels_last(x):
        if _cpu_kernels(x):
            peak, index = F.max_pool2d(x, (h, w), return_indices=True)
            return peak.view(n, c), index.view(n, c)
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c).max(1)  # a view in this layout
    return x.reshape(n, c, h * w).max(2)


def _avg_max_with_index(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(N, 2, C)`` average and max of each channel, and the max's flat index ``(N, C)``."""
    peak, index = spatial_max(x)
    return torch.stack((x.mean((2, 3)), peak), dim=1), index


def _pool_grad(grad: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The map's gradient from the ``(N, 2, C)`` descriptors' gradient: ``d_avg / (H*W)``
    everywhere plus ``d_max`` at each argmax.

    Pointwise, not a scatter: compiled, it fuses with the gate's backward into one pass. It is
    made of differentiable operations, so it also serves when a graph of the gradient is built.
    """
    n, c, h, w = shape
    positions = torch.arange(h * w, device=index.device).view(h, w)
    at_max = positions == index.view(n, c, 1, 1)
    avg_grad, max_grad = (g.view(n, c, 1, 1) for g in grad.unbind(1))
    return torch.where(at_max, max_grad, 0.0) + avg_grad / (h * w)


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
        (index,) = ctx.saved_tensors
        return _pool_grad(grad, index, ctx.shape)


class _PoolForGate(torch.autograd.Function):
    """``(N, C, H, W) -> (N, 2, C)`` average and max; its backward returns the map's whole
    gradient, the multiply's part included when :class:`_Gate` left it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, path: FusedPath) -> torch.Tensor:
        pooled, index = _avg_max_with_index(x)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        ctx.path = path
        return pooled

    @staticmethod
    def backward(ctx, pooled_grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        left = ctx.path._take()
        if left is None:  # the multiply returned its part itself, or got no gradient this pass
            return _pool_grad(pooled_grad, index, ctx.shape), None
        grad_out, gate, buffer = left
        grad_x = _gated_grad_plus_spread_average(grad_out, gate, pooled_grad[:, 0], buffer)
        return _add_at_argmax(grad_x, index, pooled_grad[:, 1]), None


class _Gate(torch.autograd.Function):
    """``x * gate``; in a first-order backward the gradient for ``x`` is left to
    :class:`_PoolForGate`, which adds the pooling's part to it in the same pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, path: FusedPath) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        ctx.path = path
        return x * gate[:, :, None, None]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, gate = ctx.saved_tensors
        needs_x, needs_gate, _ = ctx.needs_input_grad
        if needs_x and needs_gate and not torch.is_grad_enabled():
            # d(loss)/d(gate) reduces as soon as it multiplies; its full-size product becomes the
            # buffer of the map's gradient (one fresh allocation instead of two: on the CPU a
            # fresh one is also page-faulted in).
            buffer = grad_out * x
            ctx.path._leave(grad_out, gate, buffer)
            return None, buffer.sum((2, 3)), None
        # A graph of the gradient is being built (create_graph=True), or nothing reaches the
        # pooling: the product rule, in differentiable operations.
        grad_x = grad_out * gate[:, :, None, None] if needs_x else None
        grad_gate = (grad_out * x).sum((2, 3)) if needs_gate else None
        return grad_x, grad_gate, None


def _gated_grad_plus_spread_average(
    grad_out: torch.Tensor, gate: torch.Tensor, avg_grad: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``grad_out * gate + d_avg / (H*W)`` written into ``out`` (a full-size buffer of
    ``grad_out``'s shape and dtype), in one pass where the device broadcasts well.

    On CUDA ``addcmul`` is one kernel; on the CPU, kernels with two broadcast operands leave
    their vector path, and a multiply then an in-place add is faster.
    """
    n, c, h, w = out.shape
    gate4 = gate.view(n, c, 1, 1)
    spread = (avg_grad / (h * w)).to(grad_out.dtype).view(n, c, 1, 1)
    if _cpu_kernels(grad_out):
        return torch.mul(grad_out, gate4, out=out).add_(spread)
    return torch.addcmul(spread, grad_out, gate4, out=out)


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


def grouped_linear(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A grouped ``1x1`` ``Conv1d`` applied to one ``(N, in/G)`` input per group, as one batched
    product: the CPU's grouped convolution is slow.

    Args:
        x: ``(G, N, in/G)``, group ``k``'s input at ``x[k]``.
        conv: The convolution whose parameters are used (``G`` groups, kernel size 1).

    Returns:
        ``(G, N, out/G)``.
    """
    groups = conv.groups
    weight = conv.weight.view(groups, conv.out_channels // groups, conv.in_channels // groups)
    return _GroupedLinear.apply(x, weight, conv.bias)


class _GroupedLinear(torch.autograd.Function):
    """``x[k] @ weight[k].T + bias[k]`` for each group ``k``: x ``(G, N, in)``, weight ``(G, out, in)``.

    Autograd's own ``bmm(x, weight.transpose(1, 2))`` returns the weight's gradient transposed,
    and reshaping it back to the parameter's shape copies it; here it is computed in the weight's
    layout. The backward is made of differentiable operations, so double backward still works.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.view(weight.shape[0], 1, -1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        # Under autocast the forward's products ran in ``grad``'s dtype; the engine casts each
        # gradient back to its input's dtype.
        x, weight = x.to(grad.dtype), weight.to(grad.dtype)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight) if needs_x else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if needs_weight else None
        grad_bias = grad.sum(1).reshape(-1) if ctx.has_bias and needs_bias else None
        return grad_x, grad_weight, grad_bias


def weighted_linear_sum(layer: nn.Linear, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_b weights[:, b] * layer(hidden[:, b])`` with one product of ``layer``'s size.

    ``layer`` is linear, so the sum equals ``layer``'s matrix times ``sum_b w_b * h_b``, plus its
    bias times ``sum_b w_b``.

    Args:
        layer: The linear layer applied to every branch.
        hidden: ``(N, B, in)``, one input per branch.
        weights: ``(N, B, 1)``, one weight per sample and branch.

    Returns:
        ``(N, out)``.
    """
    mixed = torch.bmm(weights.transpose(1, 2), hidden).squeeze(1)  # (N, in)
    if layer.bias is None:
        return F.linear(mixed, layer.weight)
    return torch.addmm(weights.sum(1) * layer.bias, mixed, layer.weight.t())
