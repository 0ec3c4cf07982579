"""One stage output described: which element of a tuple to tap, its layout, prefix tokens,
channels and reduction, from the evidence the dry runs gave (:mod:`gradual_sd.probing`).

:func:`describe_output` is what :mod:`gradual_sd.stages` calls for every candidate and every
named stage; the helpers here gather the evidence a sequence's layout and prefix need when one
input size is all a model takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ._lookup import find_module
from .layout import CHANNEL_AXIS, SEQUENCE_LAYOUTS, Layout, count_prefix_tokens, resolve_layout
from .probing import SCALE, Probe, input_positions

__all__ = [
    "StageInfo",
    "Evidence",
    "describe_output",
    "select_element",
    "is_pooled",
    "layer_widths",
    "sequence_evidence",
]


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


class Evidence(NamedTuple):
    """What is known about one output besides its shape."""

    other: object = None  # its shape in the second probe
    scaled: bool = False  # whether the second probe's input was larger
    channels: int | None = None  # feature_info's channel count
    declared_layout: str | None = None  # the model's output_fmt
    grid_tokens: int | None = None  # patches its reduction or patch embedding implies
    widths: tuple[int, ...] = ()  # channel counts a sequence may have


def select_element(name: str, shape: object, batch: int, channels: int | None) -> tuple[object, int | None]:
    """The shape to tap and, for a tuple or list output, which element: the first feature
    tensor with the input's batch size, preferring one with feature_info's channel count. A
    tensor whose first axis is not the batch is described instead, as no stage."""
    if isinstance(shape, tuple):
        if shape and shape[0] == batch:
            return shape, None
        return f"a tensor of shape {shape} whose first axis is not the batch ({batch} images)", None
    if not isinstance(shape, list):
        return shape, None
    features = [
        (i, s) for i, s in enumerate(shape) if isinstance(s, tuple) and len(s) in (3, 4) and s[0] == batch
    ]
    fitting = [(i, s) for i, s in features if channels in (s[1], s[-1])]
    for index, element in fitting or features:
        return element, index
    return f"a {type(shape).__name__} of {shape}", None


def _reduction(shape: tuple[int, ...], layout: Layout, prefix: int, example: torch.Tensor) -> float:
    spatial = input_positions(example)
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


def describe_output(
    model: nn.Module,
    name: str,
    shape: object,
    example: torch.Tensor,
    evidence: Evidence,
    *,
    stage_layout: str | None = None,
    num_prefix_tokens: int | None = None,
) -> StageInfo:
    """A :class:`StageInfo` for one tapped output, or a ``ValueError`` saying what to pass."""
    shape, element = select_element(name, shape, example.shape[0], evidence.channels)
    other = evidence.other
    if element is not None and isinstance(other, list) and len(other) > element:
        other = other[element]
    if not isinstance(shape, tuple):
        raise ValueError(
            f"stage {name!r} outputs {shape}, not a feature map or sequence; tap a module that "
            f"outputs one (see gradual_sd.list_stages) and pass it in stage_names"
        )
    other_shape = other if isinstance(other, tuple) else None
    if other_shape is not None and other_shape[0] != example.shape[0] + 1:
        raise ValueError(
            f"stage {name!r} outputs {shape} for {example.shape[0]} images but {other_shape} for "
            f"{example.shape[0] + 1}: its first axis is not the batch (it folds patches or windows "
            "into it). Tap the module whose output is the whole stage (see gradual_sd.list_stages)"
        )
    sized = other_shape if evidence.scaled else None
    layout = resolve_layout(
        name,
        shape,
        other_shape=sized,
        channels=evidence.channels,
        declared=evidence.declared_layout,
        requested=stage_layout,
        widths=evidence.widths,
        scale=SCALE,
    )
    prefix = 0
    if layout == "NLC":
        grid = evidence.grid_tokens
        if grid is None and sized is None:  # one input size only: read against the input's size
            grid = _grid_from_input(shape[1], input_positions(example))
        prefix = count_prefix_tokens(
            name,
            shape[1],
            other_tokens=sized[1] if sized is not None else None,
            scale=SCALE,
            spatial_dims=len(input_positions(example)),
            grid_tokens=grid,
            declared=getattr(model, "num_prefix_tokens", None),
            requested=num_prefix_tokens,
        )
    elif layout == "NCL" and num_prefix_tokens:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} but stage {name!r} outputs {shape}, a channels-first "
            "(N, C, L) sequence with no prefix tokens; leave num_prefix_tokens unset"
        )
    axis = 3 - CHANNEL_AXIS[layout] if layout in SEQUENCE_LAYOUTS else None
    latent = axis is not None and sized is not None and sized[axis] == shape[axis]
    reduction = None if latent else _reduction(shape, layout, prefix, example)  # no resolution
    return StageInfo(name, shape, layout, int(shape[CHANNEL_AXIS[layout]]), reduction, prefix, element)


def is_pooled(stage: StageInfo, other: object, scaled: bool) -> bool:
    """Whether an output is pooled: one position (a pooler's (N, C, 1, 1) or (N, C, 1)) that
    does not grow with the input (where a larger input ran)."""
    if len(stage.shape) == 3 and 1 in stage.shape[1:]:  # one position, whichever axis has it
        return True
    axes = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,), "NCL": (2,)}[stage.layout]  # type: ignore[index]
    if math.prod(stage.shape[a] for a in axes) - stage.num_prefix_tokens > 1:
        return False
    return not (scaled and isinstance(other, tuple) and other[1:] != stage.shape[1:])


def layer_widths(module: nn.Module) -> set[int]:
    """Channel widths a module's own layers produce: linear and convolution outputs, norm widths."""
    widths = set()
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            widths.add(layer.out_features)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            widths.add(layer.out_channels)
        elif isinstance(layer, nn.LayerNorm):
            widths.add(layer.normalized_shape[-1])
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            widths.add(layer.num_features)
        elif isinstance(layer, nn.GroupNorm):
            widths.add(layer.num_channels)
    return widths


_MAX_PREFIX = 16  # class, distillation and register tokens; more would be read as patches


def _patch_grid(probe: Probe, name: str, width: int, tokens: int) -> int | None:
    """Patches in an ``(N, width, H, W)`` feature map that ran before token stage ``name`` (a
    ViT's patch-embedding convolution) in a probe of every module: of those that leave at most
    ``_MAX_PREFIX`` of its ``tokens`` over, the largest (the fewest prefix tokens), or ``None``."""
    grids = []
    for other in probe.order[: probe.order.index(name)]:
        shape = probe.shapes[other]
        if isinstance(shape, tuple) and len(shape) == 4 and shape[1] == width:
            grids.append(shape[2] * shape[3])
    fitting = [grid for grid in grids if 0 <= tokens - grid <= _MAX_PREFIX]
    return max(fitting) if fitting else None


def sequence_evidence(
    model: nn.Module, probe: Probe, name: str, shape: tuple[int, ...], hidden: int | None
) -> tuple[int | None, tuple[int, ...]]:
    """For a 3-D output: the patches of the map its sequence comes from and the widths its
    channel axis may have: that map's channels where its positions match the sequence's, the
    classifier's input width, or else the widths of the module's own layers."""
    grid = _patch_grid(probe, name, shape[2], shape[1])  # a patch embedding's map as wide as the tokens
    if grid is not None:
        return grid, (shape[2],)
    if hidden is not None and (shape[1] == hidden) != (shape[2] == hidden):
        return None, (hidden,)
    return None, tuple(sorted(layer_widths(find_module(model, name))))


def _grid_from_input(tokens: int, spatial: Sequence[int]) -> int | None:
    """The patch grid of a sequence of ``tokens`` read against the input size alone: the
    largest grid of square patches that tiles the input and leaves at most ``_MAX_PREFIX``
    tokens over (the fewest prefix tokens)."""
    side = min(spatial)
    grids = {
        math.prod(s // patch for s in spatial)
        for patch in range(1, side + 1)
        if all(s % patch == 0 for s in spatial)
    }
    fitting = [g for g in grids if 0 <= tokens - g <= _MAX_PREFIX]
    return max(fitting) if fitting else None
