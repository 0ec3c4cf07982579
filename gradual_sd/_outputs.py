"""The decisions over what the dry runs recorded (the records are ``_records``'s).

From a dry run's ``Probe`` and the model's ``ModelFacts``, :func:`observe` makes one
:class:`Observation` per module, once, and :func:`seen_again` adds the second dry run's outputs
where it ran. :func:`describe` decides from one observation alone what :class:`StageInfo` the
output has, or raises :class:`NotAStage` with the :class:`Reason` it is none, or a
:class:`~gradual_sd._layout.LayoutError` where the evidence does not settle its layout. Nothing
here runs or reads a model: ``_probing`` makes the records.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

from ._layout import (
    CHANNEL_AXIS,
    SEQUENCE_LAYOUTS,
    SPATIAL_AXES,
    LayoutError,
    count_prefix_tokens,
    resolve_layout,
)
from ._records import ModelFacts, Output, Probe, Shape, StageInfo
from ._tuning import MAX_PREFIX

if TYPE_CHECKING:
    pass


class Tapped(NamedTuple):
    """The tensor of a module's output a head would read: its shape and, for a tuple or list
    output, its index."""

    shape: Shape
    element: int | None


class Refusal(NamedTuple):
    """Why a module's output has no tensor a head could read (:class:`NotAStage`'s arguments)."""

    reason: Reason
    message: str


class Reason(enum.Enum):
    """Why a module's output is not a stage."""

    NO_FEATURES = "outputs no feature map or sequence"
    BATCH_FOLDED = "folds patches or windows into the batch axis"
    POOLED = "is pooled to one position"
    RAN_TWICE = "runs more than once in a forward pass"
    DID_NOT_RUN = "did not run in a forward pass"


class NotAStage(ValueError):
    """A module's output that no head can be put on, for ``reason``."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Observation:
    """What the dry runs showed of one module's output, and the evidence about it.

    Attributes:
        name: The module's dotted name.
        output: What it returned at the example input.
        batch: The example's batch size.
        positions: The example's sizes along the axes that grow with it (``(H, W)`` or ``(L,)``).
        other: What it returned in the second dry run (one more item, and where ``scaled`` an
            input ``SCALE`` times larger); ``None`` where that run was not used.
        scaled: Whether the second run's input was larger.
        calls: How often it ran in the first dry run.
        channels: Its channel count in timm's ``feature_info``, which vouches for the module.
        declared_layout: The layout the model declares for the modules ``feature_info`` lists.
        grid_tokens: The patches a token output holds: from ``feature_info``'s reduction, else
            from a map that ran before it and has as many positions (give or take
            ``MAX_PREFIX``) and as many channels as its tokens.
        widths: Channel counts the output may have, by source (``resolve_layout``'s ``widths``).
        declared_prefix: The model's own ``num_prefix_tokens``.
        tapped: The tensor a head would read, or why there is none: chosen once from the fields
            above, when the record is made.
    """

    name: str
    output: Output
    batch: int
    positions: tuple[int, ...]
    other: Output | None = None
    scaled: bool = False
    calls: int = 1
    channels: int | None = None
    declared_layout: str | None = None
    grid_tokens: int | None = None
    widths: tuple[tuple[str, tuple[int, ...]], ...] = ()
    declared_prefix: int | None = None
    tapped: Tapped | Refusal = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.tapped is None:  # a record written by hand: choose it now, once
            tapped = _tensor_to_tap(self.name, self.output, self.batch, self.channels)
            object.__setattr__(self, "tapped", tapped)


def _tensor_to_tap(name: str, output: Output, batch: int, channels: int | None) -> Tapped | Refusal:
    """The first 3-D or 4-D tensor of ``output`` with the batch first, preferring one with
    ``feature_info``'s channel count (TNT's blocks return pixel and patch tokens)."""
    shape = output.tensor
    if shape is not None:
        if not shape or shape[0] != batch:
            return Refusal(
                Reason.BATCH_FOLDED,
                f"stage {name!r} outputs {output} whose first axis is not the batch ({batch} "
                "images): it folds patches or windows into it. Tap the module whose output is the "
                "whole stage (see gradual_sd.list_stages)",
            )
        if len(shape) == 2:
            return Refusal(
                Reason.POOLED,
                f"stage {name!r} outputs {output}, a pooled (N, C) vector, not a feature map or "
                "sequence; tap a module before the pooling (see gradual_sd.list_stages)",
            )
        if len(shape) in (3, 4):
            return Tapped(shape, None)
    features = [
        (i, s) for i, s in enumerate(output.shapes) if s is not None and len(s) in (3, 4) and s[0] == batch
    ]
    fitting = [(i, s) for i, s in features if channels in (s[1], s[-1])]
    for index, element in fitting or features:
        return Tapped(element, index)
    return Refusal(
        Reason.NO_FEATURES,
        f"stage {name!r} outputs {output}, not a feature map or sequence; tap a module that "
        "outputs one (see gradual_sd.list_stages) and pass it in stage_names",
    )


def _tapped(obs: Observation) -> Tapped:
    """The tensor ``obs``'s record chose to tap, or :class:`NotAStage` where there is none."""
    if isinstance(obs.tapped, Refusal):
        raise NotAStage(*obs.tapped)
    return obs.tapped


def observe(probe: Probe, facts: ModelFacts, hidden: int | None = None) -> dict[str, Observation]:
    """One :class:`Observation` per module that ran in the first dry run ``probe``, in run order:
    its output, ``feature_info``'s word on it and the widths its channel axis may have (its own
    layers'; for a sequence also the map it was flattened from and ``hidden``, the classifier's
    input width, where known)."""
    info, batch = facts.info, probe.example[0]
    records = {}
    for name, output in probe.outputs.items():
        channels = info.channels.get(name)
        tapped = _tensor_to_tap(name, output, batch, channels)
        grid, widths = None, {}
        if isinstance(tapped, Tapped):
            widths["its own layers"] = facts.widths[name]
        if isinstance(tapped, Tapped) and len(tapped.shape) == 3:
            if channels is not None and name in info.reductions:
                grid = math.prod(int(s // info.reductions[name]) for s in probe.positions)
            tokens, from_map = _flattened_from(probe, name, tapped.shape)
            if tokens:
                widths["the map its tokens come from"] = (tapped.shape[2],)
            if hidden is not None:
                widths["the classifier's input"] = (hidden,)
            grid = grid if grid is not None else from_map
        records[name] = Observation(
            name,
            output,
            batch,
            probe.positions,
            calls=probe.calls[name],
            channels=channels,
            declared_layout=info.output_fmt if channels is not None else None,
            grid_tokens=grid,
            widths=tuple(widths.items()),
            declared_prefix=facts.declared_prefix,
            tapped=tapped,
        )
    return records


def seen_again(records: Mapping[str, Observation], second: Probe | None) -> dict[str, Observation]:
    """``records`` with what each module returned in the second dry run (as they are where it
    failed at both sizes): nothing is observed again."""
    if second is None:
        return dict(records)
    return {
        name: replace(obs, other=second.outputs.get(name), scaled=second.scaled)
        for name, obs in records.items()
    }


def _flattened_from(probe: Probe, name: str, shape: Shape) -> tuple[bool, int | None]:
    """Whether a 4-D map that ran before ``name`` reads as its ``(N, L, C)`` tokens (as many
    channels, as many positions give or take ``MAX_PREFIX``) and not also as its channels-first
    reshape (``(N, C, H*W)``, or an audio model's ``(N, C*H, W)`` frames); and the largest
    patch grid of the maps that read as its tokens."""
    length, width = shape[1], shape[2]
    grids, tokens = [], False
    for other in probe.order[: probe.order.index(name)]:
        map_shape = probe.outputs[other].tensor
        if map_shape is None or len(map_shape) != 4:
            continue
        _, c, h, w = map_shape
        if c == width and 0 <= length - h * w <= MAX_PREFIX:
            grids.append(h * w)
            tokens |= (c, h * w) != (length, width) and (c * h, w) != (length, width)
    return tokens, max(grids) if grids else None


def _other_shape(obs: Observation, element: int | None) -> Shape | None:
    other = obs.other
    if other is None:
        return None
    if element is None:
        return other.tensor
    return other.shapes[element] if element < len(other.shapes) else None


def _one_position(shape: Shape) -> bool:
    """At most one axis besides the batch longer than 1: (N, C, 1, 1), (N, 1, 1, C), (N, C, 1)..."""
    return sum(size > 1 for size in shape[1:]) <= 1


def describe(
    obs: Observation, *, stage_layout: str | None = None, num_prefix_tokens: int | None = None
) -> StageInfo:
    """A :class:`StageInfo` for one module's output, decided from ``obs`` alone.

    Args:
        obs: What the dry runs showed of it.
        stage_layout: The layout the user asked for (checked against the evidence).
        num_prefix_tokens: The prefix tokens the user asked for (checked likewise).

    Raises:
        NotAStage: It outputs no batch-first feature map or sequence, or one pooled to one
            position that does not grow with the input, whatever ``stage_layout`` says.
        LayoutError: The evidence does not settle its layout or prefix tokens.
    """
    name = obs.name
    shape, element = _tapped(obs)
    other = _other_shape(obs, element)
    if other is not None and other[0] != obs.batch + 1:
        raise NotAStage(
            Reason.BATCH_FOLDED,
            f"stage {name!r} outputs {shape} for {obs.batch} images but {other} for {obs.batch + 1}: "
            "its first axis is not the batch (it folds patches or windows into it). Tap the module "
            "whose output is the whole stage (see gradual_sd.list_stages)",
        )
    sized = other if obs.scaled else None
    grew = sized is not None and sized[1:] != shape[1:]
    # A model that takes one input size cannot show whether a one-position output is pooled or a
    # map its size leaves 1x1: the user who names the stage with its layout decides.
    named_at_one_size = other is not None and not obs.scaled and stage_layout is not None
    if _one_position(shape) and not grew and not named_at_one_size:
        raise _one_position_refused(obs, shape)
    layout = resolve_layout(
        name,
        shape,
        other_shape=sized,
        channels=obs.channels,
        declared=obs.declared_layout,
        requested=stage_layout,
        widths=dict(obs.widths),
    )
    prefix = 0
    if layout == "NLC":
        grid = obs.grid_tokens
        if grid is None and sized is None:  # one input size only: read against the input's size
            grid = _grid_from_input(shape[1], obs.positions)
        prefix = count_prefix_tokens(
            name,
            shape[1],
            other_tokens=sized[1] if sized is not None else None,
            spatial_dims=len(obs.positions),
            grid_tokens=grid,
            declared=obs.declared_prefix,
            requested=num_prefix_tokens,
        )
    elif layout == "NCL" and num_prefix_tokens:
        raise LayoutError(
            f"num_prefix_tokens={num_prefix_tokens} but stage {name!r} outputs {shape}, a channels-first "
            "(N, C, L) sequence with no prefix tokens; leave num_prefix_tokens unset"
        )
    if math.prod(shape[a] for a in SPATIAL_AXES[layout]) - prefix <= 1 and not grew and not named_at_one_size:
        raise _one_position_refused(obs, shape)
    axis = 3 - CHANNEL_AXIS[layout] if layout in SEQUENCE_LAYOUTS else None
    latent = axis is not None and sized is not None and sized[axis] == shape[axis]
    reduction = None if latent else _reduction(shape, layout, prefix, obs.positions)  # no resolution
    return StageInfo(name, shape, layout, int(shape[CHANNEL_AXIS[layout]]), reduction, prefix, element)


def _one_position_refused(obs: Observation, shape: Shape) -> NotAStage:
    """Why an output of one position is no stage: pooled (it did not grow at a larger input), or,
    for a model that takes one input size, one position at that size (the user may name it)."""
    if obs.other is None or obs.scaled:
        return NotAStage(
            Reason.POOLED,
            f"stage {obs.name!r} outputs {shape}, pooled to one position that does not grow with the "
            "input: not a feature map or sequence a head can use, whatever stage_layout says. Tap a "
            "module before the pooling (see gradual_sd.list_stages); if the example is so small "
            "that the stage is 1x1, pass a larger example_input",
        )
    size = "x".join(map(str, obs.positions))
    return NotAStage(
        Reason.POOLED,
        f"stage {obs.name!r} outputs {shape}: one position at {size}, the only input size the "
        "model takes (a larger example failed), so whether it is pooled or a map this size leaves "
        "1x1 cannot be told, and a head there sees one position. Tap an earlier stage (see "
        "gradual_sd.list_stages), build the model for a larger input (Hugging Face: image_size=, "
        f"timm: img_size=), or name it with stage_layout={_one_position_layout(shape)!r} to tap "
        "it as it is",
    )


def _one_position_layout(shape: Shape) -> str:
    """The layout an output of one position most likely has: its one long axis is the channels."""
    if len(shape) == 3:
        return "NCL" if shape[1] > 1 else "NLC"
    return "NHWC" if shape[-1] > 1 and shape[1] == 1 else "NCHW"


def _reduction(shape: Shape, layout: str, prefix: int, spatial: tuple[int, ...]) -> float:
    if layout in SEQUENCE_LAYOUTS:
        grid = shape[CHANNEL_AXIS[layout] % 2 + 1] - prefix  # the axis that is not the channels
        if grid <= 0:
            return float("nan")
        return (math.prod(spatial) / grid) ** (1 / len(spatial))
    height = shape[2] if layout == "NCHW" else shape[1]
    if len(spatial) == 2:
        return spatial[0] / height
    width = shape[3] if layout == "NCHW" else shape[2]
    return (math.prod(spatial) / (height * width)) ** (1 / len(spatial))


def _grid_from_input(tokens: int, spatial: Sequence[int]) -> int | None:
    """The patch grid of a sequence of ``tokens`` read against the input size alone: the
    largest grid of square patches that tiles the input and leaves at most ``MAX_PREFIX``
    tokens over (the fewest prefix tokens)."""
    side = min(spatial)
    grids = {
        math.prod(s // patch for s in spatial)
        for patch in range(1, side + 1)
        if all(s % patch == 0 for s in spatial)
    }
    fitting = [g for g in grids if 0 <= tokens - g <= MAX_PREFIX]
    return max(fitting) if fitting else None
