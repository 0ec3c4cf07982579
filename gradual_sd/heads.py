"""Auxiliary classifier heads plugged after backbone stages.

A head maps a ``(N, C, H, W)`` stage output to ``(logits, feature)``: class logits and a small
feature vector used by the feature-distillation term. Any module with that contract can be
used; :class:`GradualSelfDistiller` builds one per stage through a :data:`HeadFactory`.
"""

from __future__ import annotations

from typing import Protocol
from collections.abc import Callable

import torch
from torch import nn

from .attention import ACAM

__all__ = ["HeadFactory", "BottleneckHead", "PooledHead"]


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
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        num_classes: int,
        feature_dim: int = 128,
        attn_layer: AttnFactory | None = ACAM,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.attn = attn_layer(in_channels) if attn_layer is not None else nn.Identity()
        self.conv = nn.Conv2d(in_channels, hidden_size, kernel_size=1, bias=False)
        self.norm = norm_layer(hidden_size)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(hidden_size, num_classes)
        self.feature = nn.Linear(hidden_size, feature_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.act(self.norm(self.conv(self.attn(x))))
        pooled = x.mean((2, 3))
        return self.fc(pooled), self.feature(pooled)


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
