"""Auxiliary classifier heads plugged after backbone stages.

A head maps a ``(N, C, H, W)`` stage output to ``(logits, feature)``: class logits and a small
feature vector used by the feature-distillation term. Any module with that contract can be
used; :class:`GradualSelfDistiller` builds one per stage through a :data:`HeadFactory`.
"""

from __future__ import annotations

from typing import Protocol
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import ACAM


class HeadFactory(Protocol):
    """Builds the head for one stage. Called with keyword arguments only."""

    def __call__(
        self, *, in_channels: int, hidden_size: int, num_classes: int, feature_dim: int
    ) -> nn.Module: ...


AttnFactory = Callable[[int], nn.Module]


class BottleneckHead(nn.Module):
    """GSDNet's adaptive classifier for an intermediate stage.

    attention -> 1x1 conv to ``hidden_size`` (the final stage's width) -> BN -> ReLU -> global
    average pool -> two linear layers: ``num_classes`` logits and a ``feature_dim`` feature.

    ``pool_size``: ``None`` is the paper's head, whose projection runs at the stage's full
    resolution; its memory traffic can cost more than the stage itself. An int first
    average-pools the attended map to at most ``pool_size x pool_size`` (adaptive pooling; a
    smaller side is kept as is, never upsampled), so the projection, BN and ReLU run on that
    small grid. The 1x1 conv commutes with average pooling, so only where the nonlinearity acts
    changes: same parameters and state_dict keys as the paper's head, either loads the other's.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        num_classes: int,
        feature_dim: int = 128,
        attn_layer: AttnFactory | None = ACAM,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        pool_size: int | None = None,
    ) -> None:
        super().__init__()
        if pool_size is not None and (
            isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1
        ):
            raise ValueError(
                f"pool_size must be a positive int (the pooled grid's largest side) or None (the "
                f"paper's full-resolution head), got {pool_size!r}"
            )
        self.pool_size = pool_size
        self.attn = attn_layer(in_channels) if attn_layer is not None else nn.Identity()
        self.conv = nn.Conv2d(in_channels, hidden_size, kernel_size=1, bias=False)
        self.norm = norm_layer(hidden_size)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(hidden_size, num_classes)
        self.feature = nn.Linear(hidden_size, feature_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.attn(x)
        if self.pool_size is not None:
            x = F.adaptive_avg_pool2d(x, [min(self.pool_size, side) for side in x.shape[-2:]])
        pooled = self.act(self.norm(self.conv(x))).mean((2, 3))
        return self.fc(pooled), self.feature(pooled)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class PooledHead(nn.Module):
    """A cheap head: attention -> global average pool -> the two linear layers.

    It skips the full-resolution 1x1 projection of :class:`BottleneckHead`, whose cost grows
    with the stage's spatial size times the final width.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        num_classes: int,
        feature_dim: int = 128,
        attn_layer: AttnFactory | None = ACAM,
    ) -> None:
        super().__init__()
        del hidden_size  # part of the factory contract; this head keeps the stage's width
        self.attn = attn_layer(in_channels) if attn_layer is not None else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        self.feature = nn.Linear(in_channels, feature_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.attn(x).mean((2, 3))
        return self.fc(pooled), self.feature(pooled)
