"""GSDNet as the authors' code (476037156/GSDNet) trains it: opt in with ``as_shipped=True``.

With the same weights, the authors' network and the clean method agree to rounding once one
quirk is removed. As shipped, their training differs in four ways, all reproduced here:

* Their forward sums the heads' outputs with an in-place ``+=`` on the first head's tensors,
  so the first student of the (layer1, layer2) pair is ``z1 + z2 + z3 + z4`` (and
  ``F1 + F2 + F3 + F4``): that pair's terms send gradient into every head, the network's
  classifier and the last 128-d projection.
* That projection (their ``fc_4``) is an ordinary trainable layer under the optimiser's weight
  decay; it receives gradient only through the sum. The clean method keeps it fixed.
* The heads' 1x1 conv has a bias (before BatchNorm).
* Convolutions start from ``N(0, sqrt(2 / (k * k * out_channels)))`` and BatchNorm from weight
  1, bias 0; linear layers keep PyTorch's defaults.

Their training loop also drops the last partial batch and keeps the best epoch with ties going
to the later one; ``train_gsdnet.py --as-shipped`` does both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradual_sd import BottleneckHead, DistillerOutput, GradualSelfDistiller
from gradual_sd import FiniteCheck


class ShippedHead(BottleneckHead):
    """The paper's adaptive classifier with the authors' bias on its 1x1 conv."""

    def __init__(self, in_channels: int, hidden_size: int, **kwargs) -> None:
        super().__init__(in_channels, hidden_size, **kwargs)
        self.conv = nn.Conv2d(in_channels, hidden_size, kernel_size=1, bias=True)


def reference_init(module: nn.Module) -> nn.Module:
    """The authors' initialisation, in place: every ``Conv2d`` weight from
    ``N(0, sqrt(2 / (k * k * out_channels)))``, every ``BatchNorm2d`` at weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class ShippedGSDNet(nn.Module):
    """A :class:`GradualSelfDistiller` trained the way the authors' code trains it.

    Same call interface as the distiller (``forward(images, targets=None, *, run_heads=None)``
    returns a :class:`DistillerOutput`). ``head_logits``/``head_features`` are every head's own
    outputs; only the loss sees the authors' sum. ``projection`` is the trainable last feature
    layer; the distiller's fixed projection is not used.
    """

    def __init__(self, distiller: GradualSelfDistiller, feature_dim: int = 128) -> None:
        super().__init__()
        if distiller.loss.teacher != "neighbour":
            raise ValueError(
                f"the authors' code teaches each head by its neighbour; teacher "
                f"{distiller.loss.teacher!r} has no shipped counterpart"
            )
        self.distiller = distiller
        weight = distiller.teacher_projection_weight
        self.projection = nn.Linear(distiller.hidden_size, feature_dim)  # drawn on the CPU in float32
        self.projection.to(device=weight.device, dtype=weight.dtype)

    @property
    def model(self) -> nn.Module:
        return self.distiller.model

    @property
    def stage_names(self) -> tuple[str, ...]:
        return self.distiller.stage_names

    @property
    def classifier_name(self) -> str:
        return self.distiller.classifier_name

    @property
    def head_names(self) -> tuple[str, ...]:
        return self.distiller.head_names

    @property
    def finite_check(self) -> FiniteCheck | None:
        return self.distiller.finite_check

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor | None = None, *, run_heads: bool | None = None
    ) -> DistillerOutput:
        if run_heads is None:
            run_heads = self.training and targets is not None
        if not run_heads:
            return self.distiller(images, targets, run_heads=False)
        out = self.distiller(images, run_heads=True)
        logits = out.head_logits
        features = (*out.head_features[:-1], self.projection(out.pre_logits))
        if targets is None:
            return out._replace(head_features=features)
        # The authors' `pred += ...` on the first head's tensors: its student is every head's sum.
        students = (torch.stack(logits).sum(0), *logits[1:])
        student_features = (torch.stack(features).sum(0), *features[1:])
        names = (*self.stage_names, self.classifier_name)
        loss, losses = self.distiller.loss(students, student_features, targets, names)
        if self.finite_check is not None:  # the distiller checks only the loss it computes itself
            self.finite_check.submit(
                [loss, *losses.values()], lambda: ["loss", *(f"term {k}" for k in losses)]
            )
        return DistillerOutput(out.logits, loss, losses, logits, features, out.pre_logits)
