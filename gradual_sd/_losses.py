"""Gradual self-distillation loss: cross-entropy on the last classifier plus, for every
student/teacher pair of heads, a KL term on softened logits and an L2 term on features.

Two formulations of the pair terms:

* ``"reference"`` (default) follows the GSDNet reference code: the soft cross-entropy
  ``-sum softmax(t/T) * log_softmax(s/T)`` averaged over the batch, without a ``T**2`` factor,
  and the L2 norm of the whole ``(N, D)`` feature difference (``torch.dist``), which grows with
  the square root of the batch size.
* ``"normalized"`` uses Hinton's ``T**2``-scaled KL divergence (batch mean) and the per-sample
  squared L2 distance averaged over the batch, so neither depends on the batch size.

The soft cross-entropy and the KL divergence differ by the teacher's entropy, a constant for
the student, so both give the same gradients up to the ``T**2`` factor.
"""

from __future__ import annotations

from typing import ClassVar, Literal
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


Teacher = Literal["neighbour", "deepest"]
Formulation = Literal["reference", "normalized"]
TEACHERS: tuple[str, ...] = ("neighbour", "deepest")
FORMULATIONS: tuple[str, ...] = ("reference", "normalized")


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Batch-mean cross-entropy between temperature-softened teacher and student (no T^2)."""
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(teacher * student).sum(dim=1).mean()


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T**2 * KL(teacher || student)`` of softened distributions, averaged over the batch."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def feature_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L2 norm of the whole batch's feature difference (the reference code's ``torch.dist``)."""
    return torch.linalg.vector_norm(student.float() - teacher.float())


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 distance, averaged over the batch."""
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean()


def distillation_pairs(num_heads: int, teacher: Teacher = "neighbour") -> list[tuple[int, int]]:
    """``(student, teacher)`` head indices, shallow to deep; the last head is the classifier.

    ``"neighbour"`` is GSDNet's gradual scheme (head j+1 teaches head j); ``"deepest"`` is
    BYOT's (the last classifier teaches every other head).
    """
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    last = num_heads - 1
    return [(j, j + 1 if teacher == "neighbour" else last) for j in range(last)]


INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def soft_target_tolerance(dtype: torch.dtype) -> float:
    """How far a row of class probabilities may sum from 1 (rounding of the dtype)."""
    return 1e-2 if torch.finfo(dtype).bits <= 16 else 1e-4


def targets_valid(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A 0-dim boolean on the targets' device, true when the values are valid: class indices in
    ``[0, num_classes)``, or probabilities that are finite, non-negative and sum to 1 per row."""
    if not targets.is_floating_point():
        return ((targets >= 0) & (targets < num_classes)).all()
    sums = targets.float().sum(dim=1)
    tolerance = soft_target_tolerance(targets.dtype)
    return torch.isfinite(targets).all() & (targets >= 0).all() & ((sums - 1).abs() <= tolerance).all()


def target_rule(targets: torch.Tensor, num_classes: int) -> str:
    """What :func:`targets_valid` requires of ``targets``, for an error message."""
    if not targets.is_floating_point():
        return f"class-index targets outside [0, {num_classes - 1}]"
    return (
        "soft targets must be finite, non-negative probabilities whose rows sum to 1 "
        f"(within {soft_target_tolerance(targets.dtype):g})"
    )


def check_targets(
    targets: torch.Tensor, batch_size: int, num_classes: int, check_range: bool | None = None
) -> None:
    """Raise a clear error for targets that cross-entropy would reject obscurely or misuse.

    Shape and dtype checks are free; the value check (class indices in range; probabilities
    finite, non-negative, rows summing to 1) reads the targets, which on an accelerator is one
    device sync, so ``check_range=None`` checks CPU targets only (never while compiling)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.is_floating_point():
        if targets.shape != (batch_size, num_classes):
            raise ValueError(
                f"float targets are class probabilities and must have shape "
                f"({batch_size}, {num_classes}); got {tuple(targets.shape)}"
            )
        if check_range is None:
            check_range = targets.device.type == "cpu"
        if check_range and targets.numel() and not torch.compiler.is_compiling():
            if not bool(targets_valid(targets, num_classes)):
                sums = targets.double().sum(dim=1)
                raise ValueError(
                    f"{target_rule(targets, num_classes)}; got values from {targets.min().item():g} "
                    f"to {targets.max().item():g} and row sums from {sums.min().item():g} to "
                    f"{sums.max().item():g}. Normalise them, e.g. targets.softmax(1) of scores"
                )
        return
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"targets must be class indices (an integer tensor) or class probabilities (a float "
            f"tensor); got dtype {targets.dtype}"
        )
    if targets.shape != (batch_size,):
        raise ValueError(f"class-index targets must have shape ({batch_size},), got {tuple(targets.shape)}")
    if check_range is None:
        check_range = targets.device.type == "cpu"
    if check_range and targets.numel() and not torch.compiler.is_compiling():
        low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"targets must lie in [0, {num_classes - 1}] for {num_classes} classes; "
                f"got values from {low} to {high}"
            )


class GradualDistillationLoss(nn.Module):
    """The GSDNet training objective over a list of heads, shallow to deep.

    ``loss = CE(z_last, y) + sum over pairs (s, t) of
    kl_weight * KL(z_t.detach() -> z_s; T) + feature_weight * L2(f_s, f_t.detach())``
    (plus ``aux_ce_weight * CE(z_s, y)`` for every shallower head when that weight is > 0).

    Args:
        temperature: Softening temperature T of the KL term (paper: 3).
        kl_weight: Weight of each pair's KL term (paper: 0.3).
        feature_weight: Weight of each pair's feature term (paper: 0.01).
        teacher: ``"neighbour"`` (gradual, the paper) or ``"deepest"`` (BYOT-style).
        formulation: ``"reference"`` (the paper's code) or ``"normalized"``; see module doc.
        aux_ce_weight: Cross-entropy weight on the auxiliary heads (paper: 0, CE on the last
            classifier only).
        label_smoothing: Passed to every cross-entropy term; in ``[0, 1)``.
        check_target_range: Check that class indices lie in ``[0, num_classes)``. ``None``: for
            targets on the CPU, where it is free. ``True``: on an accelerator too, at one device
            sync per call (unchecked, an out-of-range index ends in a device-side assert there).
            :class:`GradualSelfDistiller` checks accelerator targets itself, without a sync.
    """

    TEACHERS: ClassVar[tuple[str, ...]] = TEACHERS  # the values ``teacher`` takes
    FORMULATIONS: ClassVar[tuple[str, ...]] = FORMULATIONS  # the values ``formulation`` takes

    def __init__(
        self,
        temperature: float = 3.0,
        kl_weight: float = 0.3,
        feature_weight: float = 0.01,
        teacher: Teacher = "neighbour",
        formulation: Formulation = "reference",
        aux_ce_weight: float = 0.0,
        label_smoothing: float = 0.0,
        check_target_range: bool | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        for name, value in (
            ("kl_weight", kl_weight),
            ("feature_weight", feature_weight),
            ("aux_ce_weight", aux_ce_weight),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        self.temperature = float(temperature)
        self.kl_weight = float(kl_weight)
        self.feature_weight = float(feature_weight)
        self.teacher = teacher
        self.formulation = formulation
        self.aux_ce_weight = float(aux_ce_weight)
        self.label_smoothing = float(label_smoothing)
        self.check_target_range = check_target_range

    def forward(
        self,
        logits: Sequence[torch.Tensor],
        features: Sequence[torch.Tensor],
        targets: torch.Tensor,
        names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the total loss and its weighted terms keyed ``ce``, ``ce/<head>``,
        ``kl/<student>`` and ``feature/<student>``."""
        if len(logits) != len(features) or len(logits) < 1:
            raise ValueError(
                f"need one feature per head and at least one head; got {len(logits)} logits "
                f"and {len(features)} features"
            )
        names = [str(i) for i in range(len(logits))] if names is None else list(names)
        if len(names) != len(logits):
            raise ValueError(f"got {len(names)} names for {len(logits)} heads")
        check_targets(targets, logits[-1].shape[0], logits[-1].shape[1], self.check_target_range)

        kl_term = soft_cross_entropy if self.formulation == "reference" else kl_divergence
        feature_term = feature_l2 if self.formulation == "reference" else feature_mse
        losses = {"ce": self._cross_entropy(logits[-1], targets)}
        for s, t in distillation_pairs(len(logits), self.teacher):
            if self.aux_ce_weight > 0:
                losses[f"ce/{names[s]}"] = self.aux_ce_weight * self._cross_entropy(logits[s], targets)
            losses[f"kl/{names[s]}"] = self.kl_weight * kl_term(
                logits[s], logits[t].detach(), self.temperature
            )
            losses[f"feature/{names[s]}"] = self.feature_weight * feature_term(
                features[s], features[t].detach()
            )
        return torch.stack(list(losses.values())).sum(), losses

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The plain classification term (validated targets, float32, label smoothing)."""
        check_targets(targets, logits.shape[0], logits.shape[1], self.check_target_range)
        return self._cross_entropy(logits, targets)

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float() if targets.is_floating_point() else targets.long()
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, kl_weight={self.kl_weight}, "
            f"feature_weight={self.feature_weight}, teacher={self.teacher!r}, "
            f"formulation={self.formulation!r}, aux_ce_weight={self.aux_ce_weight}"
        )
