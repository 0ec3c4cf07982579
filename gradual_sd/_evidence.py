"""Gather what the dry runs and the model say about one module's output into an
:class:`~gradual_sd._outputs.Observation`: its shapes, timm's ``feature_info``, and the widths
its channel axis may have.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

from torch import nn

from ._lookup import find_module
from ._outputs import NotAStage, Observation, select
from ._probing import DryRuns, Probe, Shape
from ._tuning import MAX_PREFIX

__all__ = ["FeatureInfo", "layer_widths", "observe"]


class FeatureInfo(NamedTuple):
    """What timm's ``feature_info`` says: every entry's module and reduction, in order, and the
    channels and reductions of the modules it lists once."""

    entries: tuple[tuple[str, float | None], ...]
    channels: dict[str, int]
    reductions: dict[str, float]
    output_fmt: str | None

    @classmethod
    def of(cls, model: nn.Module) -> FeatureInfo:
        info = getattr(model, "feature_info", None)
        if isinstance(info, (list, tuple)) and all(isinstance(e, dict) and "module" in e for e in info):
            entries = list(info)
        else:
            get_dicts = getattr(info, "get_dicts", None)
            entries = list(get_dicts()) if callable(get_dicts) else []
        names = [e["module"] for e in entries]
        once = [e for e in entries if names.count(e["module"]) == 1]
        fmt = getattr(model, "output_fmt", None)
        return cls(
            tuple((e["module"], e.get("reduction")) for e in entries),
            {e["module"]: int(e["num_chs"]) for e in once if "num_chs" in e},
            {e["module"]: e["reduction"] for e in once if e.get("reduction")},
            fmt if isinstance(fmt, str) else None,
        )

    def stages(self, min_reduction: float) -> list[str]:
        """The modules of the entries at ``min_reduction`` or deeper (or of no reduction), each
        once, in entry order."""
        deep = (n for n, r in self.entries if (r if r is not None else min_reduction) >= min_reduction)
        return list(dict.fromkeys(deep))


def layer_widths(module: nn.Module) -> tuple[int, ...]:
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
    return tuple(sorted(widths))


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


def observe(
    model: nn.Module,
    runs: DryRuns,
    name: str,
    info: FeatureInfo,
    *,
    second: bool,
    hidden: int | None = None,
) -> Observation:
    """Gather what the dry runs show of module ``name``'s output into an :class:`Observation`.

    Args:
        model: The model.
        runs: The dry runs; the first must have seen ``name`` run.
        name: The module.
        info: The model's ``feature_info``.
        second: Use the second dry run (running it if it has not run).
        hidden: The classifier's input width, where known: evidence for a sequence's channels.
    """
    first = runs.first
    other = runs.second if second else None
    vouched = name in info.channels
    obs = Observation(
        name,
        first.outputs[name],
        first.batch,
        first.positions,
        other.outputs.get(name) if other is not None else None,
        other is not None and other.scaled,
        first.calls[name],
        info.channels.get(name),
        info.output_fmt if vouched else None,
        declared_prefix=getattr(model, "num_prefix_tokens", None),
    )
    try:
        shape, _ = select(obs)
    except NotAStage:
        return obs
    widths = {"its own layers": layer_widths(find_module(model, name))}
    if len(shape) != 3:
        return replace(obs, widths=tuple(widths.items()))
    grid = None
    if vouched and name in info.reductions:
        grid = math.prod(int(s // info.reductions[name]) for s in first.positions)
    tokens, from_map = _flattened_from(first, name, shape)
    if tokens:
        widths["the map its tokens come from"] = (shape[2],)
    if hidden is not None:
        widths["the classifier's input"] = (hidden,)
    return replace(obs, grid_tokens=grid if grid is not None else from_map, widths=tuple(widths.items()))
