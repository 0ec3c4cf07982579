"""Decide which axis of a stage output holds the channels, from evidence rather than a guess.

Three kinds of evidence, each optional: the channel count timm's ``feature_info`` gives for the
module, the layout the model declares (timm's ``output_fmt``), and the shapes of two dry runs at
different input sizes (spatial axes and token counts change with the input, channels do not).
Every layout that some evidence rules out is dropped; exactly one must remain. A layout the
user asks for is checked against the same evidence.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Layout", "LAYOUTS", "resolve_layout", "count_prefix_tokens"]

Layout = Literal["NCHW", "NHWC", "NLC"]
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NLC")
_CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3, "NLC": 2}
_SPATIAL_AXES = {"NCHW": {2, 3}, "NHWC": {1, 2}, "NLC": {1}}


def _consistent_with_sizes(layout: str, shape: tuple[int, ...], other: tuple[int, ...]) -> bool | None:
    """Whether the axes that changed between two input sizes are the layout's spatial axes;
    ``None`` when nothing changed (a pooled output says nothing)."""
    changed = {axis for axis in range(1, len(shape)) if shape[axis] != other[axis]}
    if not changed:
        return None
    return changed <= _SPATIAL_AXES[layout] and _CHANNEL_AXIS[layout] not in changed


def resolve_layout(
    name: str,
    shape: tuple[int, ...],
    *,
    other_shape: tuple[int, ...] | None = None,
    channels: int | None = None,
    declared: str | None = None,
    requested: str | None = None,
) -> Layout:
    """The layout of stage ``name``'s output, or a ``ValueError`` that names ``stage_layout``.

    Args:
        shape: The output's shape at the example input.
        other_shape: Its shape at a second input size, when the model accepted one.
        channels: The channel count the model documents for this module (timm feature_info).
        declared: The layout the model declares for its feature maps (timm ``output_fmt``).
        requested: The layout the user asked for; it must not contradict the evidence.
    """
    if len(shape) == 3:
        candidates = ["NLC"]
    elif len(shape) == 4:
        candidates = ["NCHW", "NHWC"]
    else:
        raise ValueError(
            f"stage {name!r} outputs a tensor of shape {shape}; expected a feature map "
            "(N, C, H, W), (N, H, W, C) or a token sequence (N, L, C)"
        )
    if requested is not None and requested not in LAYOUTS[:2]:
        raise ValueError(f"stage_layout must be one of {LAYOUTS[:2]} or None, got {requested!r}")
    evidence: list[str] = []
    if other_shape is not None and len(other_shape) == len(shape):
        verdicts = {layout: _consistent_with_sizes(layout, shape, other_shape) for layout in candidates}
        if all(v is not None for v in verdicts.values()):
            candidates = [layout for layout in candidates if verdicts[layout]]
            evidence.append(f"its shape changes from {shape} to {other_shape} with the input size")
    if channels is not None:
        candidates = [layout for layout in candidates if shape[_CHANNEL_AXIS[layout]] == channels]
        evidence.append(f"the model's feature_info gives it {channels} channels")
    if declared in LAYOUTS[:2] and len(shape) == 4:
        candidates = [layout for layout in candidates if layout == declared]
        evidence.append(f"the model declares output_fmt={declared!r}")
    said = "; ".join(evidence) if evidence else "there is no other evidence"
    if requested is not None and len(shape) == 4:
        if requested not in candidates:
            raise ValueError(
                f"stage_layout={requested!r} does not fit stage {name!r}: it outputs {shape} and {said}"
            )
        return requested  # type: ignore[return-value]
    if len(candidates) == 1:
        return candidates[0]  # type: ignore[return-value]
    if not candidates:
        raise ValueError(
            f"the evidence about stage {name!r} disagrees: it outputs {shape} and {said}. "
            "Tap another module, or check the model; stage_layout cannot override contradicting evidence"
        )
    raise ValueError(
        f"cannot tell whether stage {name!r}, with output shape {shape}, is NCHW or NHWC: {said}. "
        "Pass stage_layout='NCHW' or 'NHWC'"
    )


def count_prefix_tokens(
    name: str,
    tokens: int,
    *,
    other_tokens: int | None = None,
    scale: int = 2,
    grid_tokens: int | None = None,
    declared: int | None = None,
    requested: int | None = None,
) -> int:
    """How many leading tokens of a ``(N, L, C)`` stage output are class/register tokens.

    Measured where possible: with ``other_tokens`` from an input ``scale`` times larger, the
    grid part grows ``scale**2``-fold and the prefix stays; with ``grid_tokens`` (the number of
    patches the stage's reduction implies), the prefix is what is left over. The model's own
    ``declared`` count is used only when nothing can be measured. ``requested`` must agree with
    a measurement.
    """
    measured = None
    if other_tokens is not None:
        grid, remainder = divmod(other_tokens - tokens, scale * scale - 1)
        if remainder == 0 and 0 < grid <= tokens:
            measured = tokens - grid
    if measured is None and grid_tokens is not None and 0 < grid_tokens <= tokens:
        measured = tokens - grid_tokens
    if requested is not None:
        if not isinstance(requested, int) or requested < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {requested!r}")
        if measured is not None and measured != requested:
            raise ValueError(
                f"num_prefix_tokens={requested} but stage {name!r} carries {measured} prefix tokens "
                f"(measured from its {tokens} tokens at two input sizes or its reduction)"
            )
        return requested
    if measured is not None:
        return measured
    if declared is not None:
        return int(declared)
    raise ValueError(
        f"cannot tell how many of stage {name!r}'s {tokens} tokens are class or register tokens; "
        "pass num_prefix_tokens (0 if every token is a patch)"
    )
