"""What a model looks like to the distiller: its stages, their layouts, and its classifier.

One dry run (two where the layout or the prefix tokens need a second input size) in eval mode
without gradients describes every tapped stage, in the spirit of timm's ``FeatureInfo``:
:func:`describe_stages` is what :class:`~gradual_sd.GradualSelfDistiller` and
:func:`~gradual_sd.insert_after` build on, and :func:`list_stages` shows the candidates of a
model that timm does not describe (torchvision, hand-written models).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import NamedTuple
from collections.abc import Sequence

import torch
from torch import nn

from ._lookup import find_module, module_names
from .classifier import classifier_candidates, out_features
from .layout import LAYOUTS, Layout, count_prefix_tokens, resolve_layout
from .taps import probe_outputs

__all__ = [
    "StageInfo",
    "ModelStages",
    "describe_stages",
    "list_stages",
    "default_stage_names",
    "default_example_input",
    "find_classifier_name",
    "describe_outputs",
]

_SCALE = 2  # the second dry run's input is this many times larger


class StageInfo(NamedTuple):
    """One stage output as seen at the example input.

    Attributes:
        name: The module's dotted name.
        shape: Its output shape (for a tuple or list output, the tapped element's).
        layout: ``"NCHW"``, ``"NHWC"`` or ``"NLC"``; ``None`` where :func:`list_stages`
            could not tell.
        channels: Width of the channel axis.
        reduction: Input size over the output's spatial size (tokens: over the patch grid).
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


class ModelStages(NamedTuple):
    """Everything the distiller needs to know about a model, from :func:`describe_stages`."""

    stages: tuple[StageInfo, ...]
    classifier_name: str
    hidden_size: int
    num_classes: int


class _Probe(NamedTuple):
    # name -> output shape; for a tuple or list, a list of its elements' shapes (or type
    # names); for anything else, its type name
    shapes: dict[str, object]
    order: list[str]  # names in the order their hooks fired
    output: object  # what the model returned
    calls: Counter[str]  # how often each module ran

    def logits(self, model: nn.Module) -> torch.Tensor:
        logits = main_logits(self.output)
        if logits is None or logits.dim() != 2:
            output = self.output
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"{type(model).__name__} returned {got} in eval mode, not (N, num_classes) logits. "
                "The distiller needs a classifier: for timm, create the model with num_classes > 0 "
                "(a model with no classification head, such as a vision encoder, needs one added)"
            )
        return logits


def _as_pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A one-image zero batch at the size the model was built for.

    The size is a configured ``img_size``/``image_size`` (timm ViT and Swin patch embeddings,
    torchvision ViT), else timm's ``pretrained_cfg['input_size']``, else 224x224; the channels
    are the first convolution's input channels, else 3.
    """
    size = None
    for module in model.modules():
        size = _as_pair(getattr(module, "img_size", None)) or _as_pair(getattr(module, "image_size", None))
        if size is not None:
            break
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None and "input_size" in cfg:
        size = tuple(cfg["input_size"][1:])
    height, width = size or (224, 224)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return torch.zeros(1, channels, height, width, device=device, dtype=dtype)


def _feature_entries(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and all(isinstance(e, dict) and "module" in e for e in info):
        return list(info)
    get_dicts = getattr(info, "get_dicts", None)
    return list(get_dicts()) if callable(get_dicts) else []


def _feature_channels(model: nn.Module) -> dict[str, int]:
    """Channels per module name from timm's feature_info, for names it lists once."""
    entries = _feature_entries(model)
    names = [e["module"] for e in entries]
    return {
        e["module"]: int(e["num_chs"]) for e in entries if "num_chs" in e and names.count(e["module"]) == 1
    }


def _probe(model: nn.Module, names: Sequence[str], inputs: Sequence[str], example: torch.Tensor) -> _Probe:
    """One eval-mode dry run with hooks on ``names`` (outputs) and ``inputs`` (first input).

    A failure inside the model becomes a ``ValueError`` about the example input, which is what
    a user can change.
    """
    try:
        seen, output, calls = probe_outputs(model, names, example, input_names=inputs)
    except Exception as error:  # the model's own failure, whatever its type
        raise ValueError(
            f"{type(model).__name__} failed on the example input of shape {tuple(example.shape)}: "
            f"{type(error).__name__}: {error}. Pass example_input, a batch the model accepts"
        ) from error
    return _Probe({name: _shape_of(value) for name, value in seen.items()}, list(seen), output, calls)


def _shape_of(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape_of(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value]
    return type(value).__name__


def _select_element(name: str, shape: object, batch: int, channels: int | None) -> tuple[object, int | None]:
    """The shape to tap and, for a tuple or list output, which element: the first feature
    tensor with the input's batch size, preferring one with feature_info's channel count."""
    if not isinstance(shape, list):
        return shape, None
    features = [
        (i, s) for i, s in enumerate(shape) if isinstance(s, tuple) and len(s) in (3, 4) and s[0] == batch
    ]
    fitting = [(i, s) for i, s in features if channels in (s[1], s[-1])]
    for index, element in fitting or features:
        return element, index
    return f"a {type(shape).__name__} of {shape}", None


def _second_probe(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> dict[str, object]:
    """Output shapes at a larger input, or nothing where the model only takes one size."""
    bigger = torch.zeros(
        (*example.shape[:2], example.shape[2] * _SCALE, example.shape[3] * _SCALE),
        device=example.device,
        dtype=example.dtype,
    )
    try:
        return _probe(model, names, (), bigger).shapes
    except ValueError:  # a fixed-size model: no evidence from this source
        return {}


def main_logits(output: object) -> torch.Tensor | None:
    """The main logits of a model's output: the tensor itself, a ``.logits`` field (torchvision
    GoogLeNet and Inception in training), or the first tensor of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _reduction(shape: tuple[int, ...], layout: Layout, prefix: int, example: torch.Tensor) -> float:
    height, width = example.shape[-2:]
    if layout == "NLC":
        grid = shape[1] - prefix
        return math.sqrt(height * width / grid) if grid > 0 else float("nan")
    spatial = shape[2] if layout == "NCHW" else shape[1]
    return height / spatial


def _describe(
    model: nn.Module,
    name: str,
    shape: object,
    other: object,
    example: torch.Tensor,
    *,
    channels: int | None = None,
    grid_tokens: int | None = None,
    declared_layout: str | None = None,
    stage_layout: str | None = None,
    num_prefix_tokens: int | None = None,
) -> StageInfo:
    """A :class:`StageInfo` for one tapped output, or a ``ValueError`` saying what to pass."""
    shape, element = _select_element(name, shape, example.shape[0], channels)
    if element is not None and isinstance(other, list) and len(other) > element:
        other = other[element]
    if not isinstance(shape, tuple):
        raise ValueError(
            f"stage {name!r} returns {shape}, not a feature-map tensor; tap a module that outputs "
            f"one (see gradual_sd.list_stages) and pass it in stage_names"
        )
    other_shape = other if isinstance(other, tuple) else None
    layout = resolve_layout(
        name,
        shape,
        other_shape=other_shape,
        channels=channels,
        declared=declared_layout,
        requested=stage_layout,
    )
    prefix = 0
    if layout == "NLC":
        prefix = count_prefix_tokens(
            name,
            shape[1],
            other_tokens=other_shape[1] if other_shape is not None else None,
            scale=_SCALE,
            grid_tokens=grid_tokens,
            declared=getattr(model, "num_prefix_tokens", None),
            requested=num_prefix_tokens,
        )
    channel_axis = {"NCHW": 1, "NHWC": 3, "NLC": 2}[layout]
    reduction = _reduction(shape, layout, prefix, example)
    return StageInfo(name, shape, layout, int(shape[channel_axis]), reduction, prefix, element)


def _choose_classifier(
    model: nn.Module, candidates: list[str], probe: _Probe, classifier_name: str | None
) -> str:
    """The classifier layer that ran last among those whose width is the number of classes."""
    classes = int(probe.logits(model).shape[-1])
    modules = dict(model.named_modules())
    fitting = [n for n in probe.order if n in candidates and out_features(modules[n]) == classes]
    if not fitting:
        widths = {n: out_features(modules[n]) for n in candidates}
        where = f"classifier_name={classifier_name!r}" if classifier_name else "the model's classifier"
        raise ValueError(
            f"none of the layers in {where} ran with {classes} outputs (the model's logits); "
            f"layers and widths: {widths}. Pass classifier_name, the layer that outputs the logits"
        )
    return fitting[-1]


def find_classifier_name(
    model: nn.Module, classifier_name: str | None = None, example_input: torch.Tensor | None = None
) -> str:
    """Name of the layer that outputs the model's logits: among the linear and 1x1-conv layers
    of its classifier (:func:`~gradual_sd.classifier.classifier_candidates`), the last to run
    with ``num_classes`` outputs in one dry run."""
    candidates = classifier_candidates(model, classifier_name)
    example = default_example_input(model) if example_input is None else example_input
    return _choose_classifier(model, candidates, _probe(model, (), candidates, example), classifier_name)


def _pre_logits_width(name: str, shape: object) -> int:
    if isinstance(shape, tuple) and len(shape) in (2, 4):
        return int(shape[1])
    raise ValueError(
        f"classifier {name!r} must take (N, D) pre-logits or an (N, D, H, W) map, got {shape}; "
        "pass classifier_name, the layer that outputs the logits"
    )


def _normalize_names(model: nn.Module, stage_names: str | Sequence[str]) -> list[str]:
    names = [stage_names] if isinstance(stage_names, str) else list(stage_names)
    if not names:
        raise ValueError("stage_names is empty; name at least one stage to attach a head to")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"stage_names must be non-empty strings, got {bad}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"stage_names lists {duplicates} more than once: {names}")
    for name in names:
        find_module(model, name)
    return names


def _suggest(stages: list[StageInfo]) -> list[str]:
    """From tapped candidates in run order: per reduction, the last to finish of the
    shallowest modules (``layer1``, not ``layer1.1``, nor the next stage's first convolution,
    which runs at the old resolution); the stem (reduction < 4) is left out."""
    groups: dict[int, list[StageInfo]] = {}
    for stage in stages:
        if stage.layout is None or stage.reduction is None or not stage.reduction >= 3.5:
            continue
        groups.setdefault(round(math.log2(stage.reduction)), []).append(stage)
    chosen = []
    for members in groups.values():
        depth = min(m.name.count(".") for m in members)
        chosen.append([m.name for m in members if m.name.count(".") == depth][-1])
    order = [s.name for s in stages]
    return sorted(chosen, key=order.index)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def list_stages(model: nn.Module, example_input: torch.Tensor | None = None) -> list[StageInfo]:
    """Every submodule that outputs a feature map or token sequence before the classifier runs,
    in run order, with its shape, layout, channels and reduction at ``example_input``.

    Use it to pick ``stage_names`` for a model timm does not describe. Layouts are decided as
    :func:`describe_stages` decides them; ``layout`` is ``None`` where the evidence does not
    settle it (pass ``stage_layout`` when tapping such a module).
    """
    example = _checked_example(model, example_input)
    return _list_stages(model, example, classifier_candidates(model))[0]


def _list_stages(
    model: nn.Module, example: torch.Tensor, candidates: list[str]
) -> tuple[list[StageInfo], _Probe]:
    """The candidates, and the probe of every module (with the classifier candidates'
    inputs) they were read from."""
    # The classifier candidates get input hooks only, so the probe keeps their inputs (the
    # pre-logits) under their names, and their place in the run order is where they start.
    names = [n for n in module_names(model) if n not in candidates]
    probe = _probe(model, names, candidates, example)
    other = _second_probe(model, names, example)
    classifier = _choose_classifier(model, candidates, probe, None)
    before_classifier = probe.order[: probe.order.index(classifier)]
    channels = _feature_channels(model)
    stages = []
    for name in dict.fromkeys(before_classifier):
        if probe.calls[name] > 1:  # a shared module: a hook would see only its last call
            continue
        raw = probe.shapes[name]
        shape, element = _select_element(name, raw, example.shape[0], channels.get(name))
        if not isinstance(shape, tuple) or len(shape) not in (3, 4):
            continue
        grid = _patch_grid(probe, name, shape[2]) if len(shape) == 3 else None
        try:
            stages.append(
                _describe(
                    model, name, raw, other.get(name), example, channels=channels.get(name), grid_tokens=grid
                )
            )
        except ValueError:  # listed all the same, with what could not be decided left None
            stages.append(StageInfo(name, shape, None, None, None, 0, element))
    return stages, probe


def default_stage_names(
    model: nn.Module, example_input: torch.Tensor | None = None, *, include_last: bool = False
) -> list[str]:
    """Stages to put heads after: timm's ``feature_info`` stages, without the stem (reduction
    < 4) and without the last stage, which feeds the model's own classifier (``include_last``
    keeps it, e.g. to put attention before the final pooling).

    Where ``feature_info`` is missing, names modules that do not exist outside
    ``features_only`` mode, lists one module twice or names one that does not output a
    tensor, the stages come from the shapes instead (see :func:`list_stages`): per reduction,
    the shallowest module to finish last.
    """
    example = _checked_example(model, example_input)
    names, _ = _default_names(model, example, classifier_candidates(model))
    return names if include_last else names[:-1]


def _default_names(
    model: nn.Module, example: torch.Tensor, candidates: list[str]
) -> tuple[list[str], _Probe]:
    """Every default stage, the last included, and the dry run (with hooks on those stages and
    on the inputs of ``candidates``) that found them, for :func:`describe_stages` to reuse."""
    entries = [e for e in _feature_entries(model) if e.get("reduction", 4) >= 4]
    names = list(dict.fromkeys(e["module"] for e in entries))
    existing = set(module_names(model))
    if len(names) >= 2 and all(n in existing for n in names):
        probe = _probe(model, names, candidates, example)
        batch = example.shape[0]
        if all(isinstance(_select_element(n, probe.shapes.get(n), batch, None)[0], tuple) for n in names):
            return sorted(names, key=probe.order.index), probe
    stages, probe = _list_stages(model, example, candidates)
    suggested = _suggest(stages)
    if len(suggested) < 2:
        listed = {s.name for s in stages}
        outermost = [s for s in stages if not any(a in listed for a in _ancestors(s.name))]
        listing = ", ".join(f"{s.name} {s.shape}" for s in outermost[-12:]) or "none"
        raise ValueError(
            f"cannot find stages of {type(model).__name__} to put heads after; pass stage_names, "
            f"shallow to deep. gradual_sd.list_stages(model) lists every candidate; the outermost "
            f"are: {listing}"
        )
    return suggested, probe


def _checked_example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is None:
        return default_example_input(model)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        got = (
            tuple(example_input.shape)
            if isinstance(example_input, torch.Tensor)
            else type(example_input).__name__
        )
        raise ValueError(f"example_input must be an (N, C, H, W) image batch, got {got}")
    return example_input


def _patch_grid(probe: _Probe, name: str, width: int) -> int | None:
    """Patches in the last ``width``-channel feature map that ran before token stage ``name``
    (a ViT's patch-embedding convolution) in a probe of every module, or ``None``."""
    grid = None
    for other in probe.order[: probe.order.index(name)]:
        shape = probe.shapes[other]
        if isinstance(shape, tuple) and len(shape) == 4 and width in (shape[1], shape[3]):
            grid = shape[2] * shape[3] if shape[1] == width else shape[1] * shape[2]
    return grid


def _stage_infos(
    model: nn.Module,
    names: list[str],
    probe: _Probe,
    example: torch.Tensor,
    stage_layout: str | None,
    num_prefix_tokens: int | None,
) -> tuple[StageInfo, ...]:
    if stage_layout is not None and stage_layout not in LAYOUTS[:2]:
        raise ValueError(f"stage_layout must be one of {LAYOUTS[:2]} or None, got {stage_layout!r}")
    missing = [name for name in names if name not in probe.shapes]
    if missing:
        raise ValueError(f"modules {missing} did not run in a forward pass of the model")
    repeated = {name: probe.calls[name] for name in names if probe.calls[name] > 1}
    if repeated:
        raise ValueError(
            f"modules {repeated} run more than once in a forward pass (times shown), so a hook on "
            "them sees only the last call; pass stage_names that run once (see list_stages)"
        )
    channels = _feature_channels(model)
    reductions = {e["module"]: e.get("reduction") for e in _feature_entries(model)}
    declared = getattr(model, "output_fmt", None)
    height, width = example.shape[-2:]
    second: dict[str, object] | None = None
    everything: _Probe | None = None
    stages = []
    for name in names:
        shape = probe.shapes[name]
        known = name in channels
        selected, _ = _select_element(name, shape, example.shape[0], channels.get(name))
        tokens = isinstance(selected, tuple) and len(selected) == 3
        grid = None
        if tokens and known and reductions.get(name):
            grid = int(height // reductions[name]) * int(width // reductions[name])
        evidence = dict(
            channels=channels.get(name),
            declared_layout=declared if known else None,
            stage_layout=stage_layout,
            num_prefix_tokens=num_prefix_tokens,
        )
        stage = None
        with contextlib.suppress(ValueError):
            stage = _describe(model, name, shape, None, example, grid_tokens=grid, **evidence)
        # A second input size settles what one could not and counts prefix tokens; a model that
        # takes one size only has its patch grid counted from the map its tokens come from.
        if stage is None or (tokens and grid is None and num_prefix_tokens is None):
            if second is None:
                second = _second_probe(model, names, example)
            other = second.get(name)
            if tokens and grid is None:
                if everything is None:
                    everything = _probe(model, module_names(model), (), example)
                grid = _patch_grid(everything, name, selected[2])
            stage = _describe(model, name, shape, other, example, grid_tokens=grid, **evidence)
        stages.append(stage)
    return tuple(stages)


def describe_outputs(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    stage_layout: Layout | None = None,
    num_prefix_tokens: int | None = None,
    example_input: torch.Tensor | None = None,
) -> tuple[StageInfo, ...]:
    """A :class:`StageInfo` for each named module's output, decided as
    :func:`describe_stages` decides them; the model needs no classifier."""
    names = _normalize_names(model, names)
    example = _checked_example(model, example_input)
    probe = _probe(model, names, (), example)
    return _stage_infos(model, names, probe, example, stage_layout, num_prefix_tokens)


def describe_stages(
    model: nn.Module,
    stage_names: str | Sequence[str] | None = None,
    *,
    classifier_name: str | None = None,
    stage_layout: Layout | None = None,
    num_prefix_tokens: int | None = None,
    example_input: torch.Tensor | None = None,
) -> ModelStages:
    """Describe the stages to tap and the classifier, raising for anything the heads cannot use.

    Arguments mean what they mean for :class:`~gradual_sd.GradualSelfDistiller`. The stages
    must be listed shallow to deep in the order they run. A stage that returns a tuple or list
    is tapped at its first tensor with the input's batch size, preferring one with the channel
    count ``feature_info`` gives (TNT's blocks return pixel and patch tokens).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    example = _checked_example(model, example_input)
    candidates = classifier_candidates(model, classifier_name)
    if stage_names is None:
        # The dry run that found the stages also saw their outputs and the classifier's input.
        names, probe = _default_names(model, example, candidates)
        names = names[:-1]
    else:
        names = _normalize_names(model, stage_names)
        probe = None
    overlap = [n for n in names if n in candidates]
    if overlap:
        raise ValueError(
            f"{overlap} is the model's classifier (the deepest head); stage_names lists only the "
            "stages before it"
        )
    if probe is None:
        probe = _probe(model, names, candidates, example)
    stages = _stage_infos(model, names, probe, example, stage_layout, num_prefix_tokens)
    classifier = _choose_classifier(model, candidates, probe, classifier_name)
    order = [name for name in probe.order if name in names]
    if order != names:
        raise ValueError(
            f"stage_names must be listed shallow to deep in the order they run; got {names}, "
            f"but they ran as {order}"
        )
    hidden_size = _pre_logits_width(classifier, probe.shapes[classifier])
    return ModelStages(stages, classifier, hidden_size, int(probe.logits(model).shape[-1]))
