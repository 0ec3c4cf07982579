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
from einops import rearrange
from timm.layers import create_act_layer, make_divisible
from torch import nn

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
        grouped = rearrange(pooled, "n k c -> n (k c) 1")
        weights = self.weight_fc2(self.weight_act(self.weight_fc1(grouped)))
        return weights.softmax(dim=1) if self.normalize_weights else weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The max pool keeps its arg-max, so its backward is a scatter to one position; amax's
        # backward compares the whole map with the maximum (about 5 % of a ResNet50 step).
        peak = F.adaptive_max_pool2d(x, 1).flatten(1)
        pooled = torch.stack((x.mean((2, 3)), peak), dim=1)  # (N, 2, C): avg, max
        branch_logits = self.fc2(self.act(self.fc1(pooled)))
        attn = (branch_logits * self.branch_weights(pooled)).sum(dim=1)
        # CUDA autocast runs sum in float32; without the cast the product would promote the
        # whole map (and every layer after it) to float32.
        return x * rearrange(self.gate(attn), "n c -> n c 1 1").to(x.dtype)

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
