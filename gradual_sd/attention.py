"""ACAM: adaptive channel attention.

From GSDNet (Zhang et al., "A gradual self distillation network with adaptive channel attention
for facial expression recognition", Applied Soft Computing 2024). Like CBAM's channel gate, the
average- and max-pooled descriptors go through one shared MLP; unlike it, each branch is scaled
by a per-sample scalar that a small MLP of its own predicts from that descriptor.

The constructor follows timm's attention-layer contract (``channels, rd_ratio, rd_channels,
rd_divisor, act_layer, gate_layer, device, dtype``), so ``ACAM`` can be passed wherever timm
takes ``attn_layer=`` or ``se_layer=``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import create_act_layer, make_divisible
from torch import nn

from .pooled_gate import avg_max_pool, pooled_gate

__all__ = ["ACAM", "NormalizedACAM"]


class ACAM(nn.Module):
    """Adaptive channel attention for ``(N, C, H, W)`` feature maps.

    ``gate(f(avg) * g_avg(avg) + f(max) * g_max(max))`` multiplies the input channel-wise, where
    ``f`` is the shared MLP ``C -> C*rd_ratio -> C`` and ``g_avg``/``g_max`` are MLPs
    ``C -> C*rd_ratio -> 1`` giving one weight per sample and branch.

    Args:
        channels: Input (and output) channels.
        rd_ratio: Hidden width of the MLPs relative to ``channels`` (the paper's ``1/r``, r = 16).
        rd_channels: Hidden width given directly; overrides ``rd_ratio``.
        rd_divisor: Round the hidden width to a multiple of this, and to at least this. The
            default 8 is timm's SE convention: narrow stages still get 8 hidden units (at
            ``C/16`` rounded to 1 or 2 units, the shared MLP was often dead from
            initialisation), while ResNet50's stages keep the paper's ``C/16`` (16 to 128).
        act_layer: Activation between the two layers of each MLP.
        gate_layer: Gate applied to the combined attention logits.
        mlp_bias: Whether the MLP layers have biases.
        normalize_weights: Softmax the two branch weights per sample so they are proportions.
            ``False`` (the default) matches the reference code, whose weights are unbounded.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        act_layer: str | type[nn.Module] = nn.ReLU,
        gate_layer: str | type[nn.Module] = "sigmoid",
        mlp_bias: bool = True,
        normalize_weights: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"ACAM channels must be a positive int, got {channels!r}")
        if rd_channels is None:
            if not rd_ratio > 0:
                raise ValueError(f"ACAM rd_ratio must be > 0, got {rd_ratio!r}")
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        rd_channels = max(1, int(rd_channels))
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = channels
        self.rd_channels = rd_channels
        self.normalize_weights = normalize_weights
        # Shared MLP f, applied to both descriptors in one call (they are stacked on dim 1).
        self.fc1 = nn.Linear(channels, rd_channels, bias=mlp_bias, **dd)
        self.act = create_act_layer(act_layer, inplace=True)
        self.fc2 = nn.Linear(rd_channels, channels, bias=mlp_bias, **dd)
        # g_avg and g_max as one grouped MLP: group 0 reads the average, group 1 the max.
        self.weight_fc1 = nn.Conv1d(2 * channels, 2 * rd_channels, 1, groups=2, bias=mlp_bias, **dd)
        self.weight_act = create_act_layer(act_layer, inplace=True)
        self.weight_fc2 = nn.Conv1d(2 * rd_channels, 2, 1, groups=2, bias=mlp_bias, **dd)
        self.gate = create_act_layer(gate_layer)

    def branch_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(N, 2, 1)`` of the average and max branches."""
        # The grouped 1x1 convolutions as one batched matmul per layer (group k reads branch k):
        # the same parameters, without the CPU's slow grouped-convolution path.
        c = pooled.shape[-1]
        rd = self.rd_channels
        by_branch = pooled.transpose(0, 1)  # (2, N, C)
        hidden = _GroupedLinear.apply(by_branch, self.weight_fc1.weight.view(2, rd, c), self.weight_fc1.bias)
        weights = _GroupedLinear.apply(
            self.weight_act(hidden), self.weight_fc2.weight.view(2, 1, rd), self.weight_fc2.bias
        )
        weights = weights.transpose(0, 1)  # (N, 2, 1)
        return weights.softmax(dim=1) if self.normalize_weights else weights

    def gate_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The gate ``(N, C)`` from the stacked ``(N, 2, C)`` average and max descriptors."""
        hidden = self.act(F.linear(pooled, self.fc1.weight, self.fc1.bias))  # (N, 2, rd)
        weights = self.branch_weights(pooled)  # (N, 2, 1)
        # fc2 is linear, so the weighted sum of its outputs on the two branches is fc2 of the
        # weighted sum of their hidden activations, with the bias scaled by the weights' sum:
        # one product of SE's size for the second layer instead of two.
        mixed = torch.bmm(weights.transpose(1, 2), hidden).squeeze(1)  # (N, rd)
        if self.fc2.bias is None:
            return self.gate(F.linear(mixed, self.fc2.weight))
        bias = weights.sum(1) * self.fc2.bias  # (N, C)
        return self.gate(torch.addmm(bias, mixed, self.fc2.weight.t()))

    def _gate_as(self, dtype: torch.dtype, pooled: torch.Tensor) -> torch.Tensor:
        return self.gate_from_pooled(pooled).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Inductor fuses these into the same map passes as SE (see pooled_gate).
            gate = self.gate_from_pooled(avg_max_pool(x))
        elif torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return pooled_gate(x, partial(self._gate_as, x.dtype))
        else:
            gate = self.gate_from_pooled(_avg_and_max(x))
        # CUDA autocast runs sum in float32; without the cast the product would promote the
        # whole map (and every layer after it) to float32.
        return x * rearrange(gate, "n c -> n c 1 1").to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rd_channels={self.rd_channels}, "
            f"normalize_weights={self.normalize_weights}"
        )


def _avg_and_max(x: torch.Tensor) -> torch.Tensor:
    """``(N, 2, C)`` descriptors when nothing is differentiated: no argmax is needed."""
    return torch.stack((x.mean((2, 3)), x.amax((2, 3))), dim=1)


class _GroupedLinear(torch.autograd.Function):
    """``x[k] @ weight[k].T + bias[k]`` for each group ``k``: x ``(G, N, in)``, weight ``(G, out, in)``.

    Autograd's own ``bmm(x, weight.transpose(1, 2))`` returns the weight's gradient transposed,
    and reshaping it back to the parameter's shape copies it (at C = 2048 on the CPU the copy cost
    as much as the gate's multiply of a 7x7 map); here it is computed in the weight's layout.
    The backward is made of differentiable operations, so double backward still works.
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


class NormalizedACAM(ACAM):
    """ACAM whose two branch weights are softmax-normalised proportions (the paper's wording)."""

    def __init__(self, channels: int, **kwargs) -> None:
        kwargs.setdefault("normalize_weights", True)
        super().__init__(channels, **kwargs)
