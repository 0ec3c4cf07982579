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

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_act_layer, make_divisible
from torch import nn

from ._pooled_gate import gate_path, grouped_linear, weighted_linear_sum


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise self._wrong_input(x, "(N, C, H, W)", axis=1)
        path = gate_path(x, self.parameters())  # fused eager training, torch.compile or plain
        pooled = path.pool(x)  # (N, 2, C): the average and the max of each channel
        return path.multiply(x, self.gate_from_pooled(pooled))

    def gate_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The gate ``(N, C)`` from the stacked ``(N, 2, C)`` average and max descriptors."""
        weights = self.branch_weights(pooled)  # (N, 2, 1): g_avg(avg) and g_max(max)
        hidden = self.act(F.linear(pooled, self.fc1.weight, self.fc1.bias))  # f's first layer, both
        return self.gate(weighted_linear_sum(self.fc2, hidden, weights))  # w_avg f(avg) + w_max f(max)

    def branch_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(N, 2, 1)`` of the average and max branches."""
        if pooled.dim() != 3 or pooled.shape[1] != 2 or pooled.shape[2] != self.channels:
            raise self._wrong_input(pooled, "(N, 2, C)", axis=2)
        by_branch = pooled.transpose(0, 1)  # (2, N, C): g_avg reads the average, g_max the max
        hidden = self.weight_act(grouped_linear(by_branch, self.weight_fc1))
        weights = grouped_linear(hidden, self.weight_fc2).transpose(0, 1)
        return weights.softmax(dim=1) if self.normalize_weights else weights

    def _wrong_input(self, t: torch.Tensor, layout: str, axis: int) -> ValueError:
        """The error for ``t``, which is not a ``layout`` tensor with ``self.channels`` on ``axis``."""
        name, shape = f"{type(self).__name__}({self.channels})", tuple(t.shape)
        sizes = layout.strip("()").split(", ")  # e.g. ["N", "2", "C"]
        if len(shape) != len(sizes) or any(s.isdigit() and int(s) != d for s, d in zip(sizes, shape)):
            return ValueError(f"{name} takes an {layout} input, got one of shape {shape}")
        fix = f"Build it with channels={shape[axis]}, or give it a {self.channels}-channel input"
        if len(shape) == 4 and shape[-1] == self.channels:
            fix = f"Its last axis has {self.channels}: if it is (N, H, W, C), use x.permute(0, 3, 1, 2)"
        return ValueError(
            f"{name} was built for {self.channels} channels but got {shape[axis]} on axis {axis} (C) of "
            f"an input of shape {shape}, read as {layout}. {fix}"
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rd_channels={self.rd_channels}, "
            f"normalize_weights={self.normalize_weights}"
        )


class NormalizedACAM(ACAM):
    """ACAM whose two branch weights are softmax-normalised proportions (the paper's wording)."""

    def __init__(self, channels: int, **kwargs) -> None:
        kwargs.setdefault("normalize_weights", True)
        super().__init__(channels, **kwargs)
