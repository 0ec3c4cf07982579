"""Decide which axis of a stage output holds the channels, from evidence rather than a guess.

Four kinds of evidence, each optional: the channel count timm's ``feature_info`` gives for the
module, the layout the model declares (timm's ``output_fmt``), the shapes of two dry runs at
different input sizes (spatial axes and token counts change with the input, channels do not),
and the widths the channel axis can have (the module's own layers', the map a sequence was
flattened from, the classifier's input). Every layout that some evidence rules out is dropped;
exactly one must remain. A layout the user asks for is checked against the same evidence. Both
functions are pure: they read the numbers they are given and nothing else.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

from ._tuning import PADDING_PIXELS, SCALE


Layout = Literal["NCHW", "NHWC", "NLC", "NCL"]
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NLC", "NCL")
MAP_LAYOUTS = ("NCHW", "NHWC")  # 4-D outputs
SEQUENCE_LAYOUTS = ("NLC", "NCL")  # 3-D outputs: tokens, or channels-first sequences
CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3, "NLC": 2, "NCL": 1}
SPATIAL_AXES = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,), "NCL": (2,)}


class LayoutError(ValueError):
    """The evidence does not settle an output's layout or prefix tokens, contradicts itself, or
    contradicts what the user asked for; the message names the argument that settles it."""


def _consistent_with_sizes(
    layout: str, shape: tuple[int, ...], other: tuple[int, ...], scale: int
) -> bool | None:
    """Whether the axes that changed between two input sizes are the layout's spatial axes and,
    for a map, whether both grew as the sides of the input did (``scale`` times, give or take a
    padded pixel; an attention map over tokens grows ``scale**2`` times, unfolded patches along
    one axis only); ``None`` when nothing changed (a pooled output says nothing)."""
    changed = {axis for axis in range(1, len(shape)) if shape[axis] != other[axis]}
    if not changed:
        return None
    spatial = set(SPATIAL_AXES[layout])
    if layout in MAP_LAYOUTS:
        grown = changed == spatial and all(other[a] <= shape[a] * scale + PADDING_PIXELS for a in spatial)
        return grown and CHANNEL_AXIS[layout] not in changed
    return changed <= spatial and CHANNEL_AXIS[layout] not in changed


def _by_widths(
    shape: tuple[int, ...], candidates: list[str], widths: Mapping[str, Collection[int]]
) -> tuple[list[str], str | None]:
    """The candidates that the sources of ``widths`` leave, and what they said: a source tells
    where exactly one candidate's channel axis has one of its widths; one layout remains where
    every source that tells names it, all remain where two disagree."""
    picks = {}
    for source, values in widths.items():
        fitting = [layout for layout in candidates if shape[CHANNEL_AXIS[layout]] in values]
        if len(fitting) == 1:
            picks[source] = fitting[0]
    if not picks:
        return candidates, None
    said = ", ".join(f"{source} {sorted(set(widths[source]))}" for source in picks)
    if len(set(picks.values())) > 1:
        told = ", ".join(f"{source} for {layout}" for source, layout in picks.items())
        return candidates, f"the widths it may have disagree ({told})"
    layout = next(iter(picks.values()))
    return [layout], f"only its {layout} channel axis has a width of {said}"


def resolve_layout(
    name: str,
    shape: tuple[int, ...],
    *,
    other_shape: tuple[int, ...] | None = None,
    channels: int | None = None,
    declared: str | None = None,
    requested: str | None = None,
    widths: Mapping[str, Collection[int]] | None = None,
    scale: int = SCALE,
) -> Layout:
    """The layout of stage ``name``'s output, or a :class:`LayoutError` that names ``stage_layout``.

    Args:
        shape: The output's shape at the example input.
        other_shape: Its shape at an input ``scale`` times larger along each spatial axis,
            when the model accepted one.
        channels: The channel count the model documents for this module (timm feature_info).
        declared: The layout the model declares for its feature maps (timm ``output_fmt``).
        requested: The layout the user asked for; it must not contradict the evidence. A
            4-D layout applies to 4-D outputs only, a 3-D one to 3-D outputs only.
        widths: Where the other evidence leaves more than one layout, the channel counts the
            output may have, by where they come from (the module's own layers, the map a
            sequence was flattened from, the classifier's input): the layout whose channel axis
            has one of a source's widths when exactly one does, and every source that tells
            says the same.
    """
    if len(shape) == 3:
        candidates = list(SEQUENCE_LAYOUTS)
    elif len(shape) == 4:
        candidates = list(MAP_LAYOUTS)
    else:
        raise LayoutError(
            f"stage {name!r} outputs a tensor of shape {shape}; expected a feature map "
            "(N, C, H, W), (N, H, W, C) or a sequence (N, L, C) or (N, C, L)"
        )
    if requested is not None and requested not in LAYOUTS:
        raise ValueError(f"stage_layout must be one of {LAYOUTS} or None, got {requested!r}")
    if requested not in candidates:
        requested = None  # a layout for the other rank of output
    evidence: list[str] = []
    if other_shape is not None and len(other_shape) == len(shape):
        verdicts = {
            layout: _consistent_with_sizes(layout, shape, other_shape, scale) for layout in candidates
        }
        if all(v is not None for v in verdicts.values()):
            candidates = [layout for layout in candidates if verdicts[layout]]
            evidence.append(f"its shape changes from {shape} to {other_shape} with the input size")
    if channels is not None:
        candidates = [layout for layout in candidates if shape[CHANNEL_AXIS[layout]] == channels]
        evidence.append(f"the model's feature_info gives it {channels} channels")
    if declared in MAP_LAYOUTS and len(shape) == 4:
        candidates = [layout for layout in candidates if layout == declared]
        evidence.append(f"the model declares output_fmt={declared!r}")
    if len(candidates) > 1:
        candidates, said_by_widths = _by_widths(shape, candidates, widths or {})
        evidence.extend([said_by_widths] if said_by_widths else [])
    said = "; ".join(evidence) if evidence else "there is no other evidence"
    if requested is not None:
        if requested not in candidates:
            raise LayoutError(
                f"stage_layout={requested!r} does not fit stage {name!r}: it outputs {shape} and {said}"
            )
        return requested  # type: ignore[return-value]
    if len(candidates) == 1:
        return candidates[0]  # type: ignore[return-value]
    if not candidates:
        raise LayoutError(
            f"the evidence about stage {name!r} disagrees: it outputs {shape} and {said}. "
            "Tap another module, or check the model; stage_layout cannot override contradicting evidence"
        )
    first, second = candidates
    raise LayoutError(
        f"cannot tell whether stage {name!r}, with output shape {shape}, is {first} or {second}: {said}. "
        f"Pass stage_layout={first!r} or {second!r}"
    )


def count_prefix_tokens(
    name: str,
    tokens: int,
    *,
    other_tokens: int | None = None,
    scale: int = SCALE,
    spatial_dims: int = 2,
    grid_tokens: int | None = None,
    declared: int | None = None,
    requested: int | None = None,
) -> int:
    """How many leading tokens of a ``(N, L, C)`` stage output are class/register tokens.

    Measured where possible: with ``other_tokens`` from an input ``scale`` times larger along
    each of its ``spatial_dims`` axes, the grid part grows ``scale**spatial_dims``-fold and the
    prefix stays (where no token is added, the sequence is a latent array with no prefix); with
    ``grid_tokens`` (the number of
    patches the stage's reduction implies), the prefix is what is left over. The model's own
    ``declared`` count is used only when nothing can be measured. ``requested`` must agree with
    a measurement.
    """
    measured = None
    if other_tokens == tokens:  # no token follows the input's size: a latent array, no prefix
        measured = 0
    elif other_tokens is not None:
        grid, remainder = divmod(other_tokens - tokens, scale**spatial_dims - 1)
        if remainder == 0 and 0 < grid <= tokens:
            measured = tokens - grid
    if measured is None and grid_tokens is not None and 0 < grid_tokens <= tokens:
        measured = tokens - grid_tokens
    if requested is not None:
        if not isinstance(requested, int) or requested < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {requested!r}")
        if measured is not None and measured != requested:
            raise LayoutError(
                f"num_prefix_tokens={requested} but stage {name!r} carries {measured} prefix tokens "
                f"(measured from its {tokens} tokens at two input sizes or its reduction)"
            )
        return requested
    if measured is not None:
        return measured
    if declared is not None:
        return int(declared)
    raise LayoutError(
        f"cannot tell how many of stage {name!r}'s {tokens} tokens are class or register tokens; "
        "pass num_prefix_tokens (0 if every token is a patch)"
    )
