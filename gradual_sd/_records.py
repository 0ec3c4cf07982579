"""The records of what a model is and did, kept apart from the decisions made over them: a dry
run's :class:`Probe` (every module's :class:`Output` by shape), what the model says of its
modules without running (:class:`ModelFacts`, timm's ``feature_info`` as a :class:`FeatureInfo`),
and a stage as the distiller and the exit model keep it (:class:`StageInfo`, read through
:class:`StageViews`). ``_probing`` makes the first two; ``_outputs`` decides the third.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

from ._layout import Layout

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Output:
    """What a module returned in a dry run, by shape.

    Attributes:
        kind: ``"tensor"``, or the type's name (``"tuple"``, ``"list"``, ``"dict"``...).
        shapes: A tensor's shape alone; for a tuple or list, each element's shape (``None`` for an
            element that is not a tensor); empty for anything else.
    """

    kind: str
    shapes: tuple[Shape | None, ...] = ()

    @property
    def tensor(self) -> Shape | None:
        """The shape of a tensor output; ``None`` for anything else."""
        return self.shapes[0] if self.kind == "tensor" else None

    def __str__(self) -> str:
        if self.kind == "tensor":
            return f"a tensor of shape {self.shapes[0]}"
        if self.kind in ("tuple", "list"):
            parts = ", ".join(str(s) if s is not None else "a non-tensor" for s in self.shapes)
            return f"a {self.kind} of [{parts}]"
        return f"a {self.kind}"


@dataclass
class Probe:
    """What one dry run saw.

    Attributes:
        outputs: Every module that ran, in the order it first finished (what its last call
            returned).
        inputs: The first input of each watched module (the classifier candidates).
        starts: For each watched module, how many outputs had finished when it first started.
        calls: How often each module ran.
        logits: The returned ``(N, num_classes)`` logits, where the run was asked for them.
        watched_outputs: The output tensor of each watched module.
        example: The shape of the input.
        positions: The input's sizes along the axes that grow with it (``(H, W)`` or ``(L,)``).
        scaled: Whether the input was ``SCALE`` times larger than the example (second run).
    """

    outputs: dict[str, Output]
    inputs: dict[str, Output]
    starts: dict[str, int]
    calls: Counter[str]
    logits: torch.Tensor | None
    watched_outputs: dict[str, torch.Tensor]
    example: Shape
    positions: Shape
    scaled: bool = False

    @cached_property
    def order(self) -> list[str]:
        return list(self.outputs)


class FeatureInfo(NamedTuple):
    """What timm's ``feature_info`` says: every entry's module and reduction, in order, and the
    channels and reductions of the modules it lists once."""

    entries: tuple[tuple[str, float | None], ...]
    channels: Mapping[str, int]
    reductions: Mapping[str, float]
    output_fmt: str | None


class ModelFacts(NamedTuple):
    """What a model says of its modules without running: ``feature_info``, each module's layer
    widths and own parameter count, the padding modules, and the declared prefix tokens."""

    info: FeatureInfo
    widths: Mapping[str, tuple[int, ...]]
    parameters: Mapping[str, int]
    padding: frozenset[str]
    declared_prefix: int | None


class StageInfo(NamedTuple):
    """One stage output as seen at the example input.

    Attributes:
        name: The module's dotted name.
        shape: Its output shape (for a tuple or list output, the tapped element's).
        layout: ``"NCHW"``, ``"NHWC"``, ``"NLC"`` (tokens) or ``"NCL"`` (a channels-first
            sequence, as 1-D convolutions give); ``None`` where :func:`list_stages` could not
            tell.
        channels: Width of the channel axis.
        reduction: Input size over the output's spatial size (tokens: over the patch grid),
            per spatial axis of the input; ``None`` for a sequence whose length does not follow
            the input's size (a latent array).
        num_prefix_tokens: Class/register tokens before the patch tokens (``NLC`` only).
        element: For a stage that returns a tuple or list, the index of the tensor tapped.
    """

    name: str
    shape: tuple[int, ...]
    layout: Layout | None
    channels: int | None
    reduction: float | None
    num_prefix_tokens: int = 0
    element: int | None = None


class StageViews:
    """Read-only per-stage tuples of a ``stages`` tuple of :class:`StageInfo`, for the classes
    that keep one (the distiller, the exit model)."""

    stages: tuple[StageInfo, ...]

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The tapped stages' names, shallow to deep."""
        return tuple(stage.name for stage in self.stages)

    @property
    def layouts(self) -> tuple[Layout, ...]:
        """Each stage output's layout."""
        return tuple(stage.layout for stage in self.stages)  # type: ignore[misc]

    @property
    def num_prefix_tokens(self) -> tuple[int, ...]:
        """The class/register tokens each stage's head drops."""
        return tuple(stage.num_prefix_tokens for stage in self.stages)
