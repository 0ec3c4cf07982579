"""What a model looks like to the distiller: its stages, their layouts, and its classifier.

One dry run (two where the layout or the prefix tokens need a second input size) in eval mode
without gradients describes every tapped stage, in the spirit of timm's ``FeatureInfo``:
:func:`describe_stages` is what :class:`~gradual_sd.GradualSelfDistiller` and
:func:`~gradual_sd.insert_after` build on, and :func:`list_stages` shows the candidates of a
model that timm does not describe (torchvision, hand-written models). The dry runs are
:mod:`gradual_sd.probing`'s, one output's description :mod:`gradual_sd.outputs`', the choice of
default stages :mod:`gradual_sd.discovery`'s, the classifier's :mod:`gradual_sd.classifier`'s;
this module puts them together.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ._lookup import find_module, module_names
from .classifier import choose_classifier, classifier_candidates, find_classifier_name, pre_logits_width
from .discovery import DEFAULT_MAX_HEADS, block_run, choose_stages, spread
from .layout import LAYOUTS, Layout
from .outputs import (
    Evidence,
    StageInfo,
    describe_output,
    is_pooled,
    layer_widths,
    select_element,
    sequence_evidence,
)
from .probing import (
    Probe,
    checked_example,
    checked_model,
    default_example_input,
    input_positions,
    main_logits,
)
from .probing import probe as run_probe
from .probing import second_probe

__all__ = [
    "StageInfo",
    "ModelStages",
    "describe_stages",
    "list_stages",
    "default_stage_names",
    "default_example_input",
    "find_classifier_name",
    "describe_outputs",
    "main_logits",
]


class ModelStages(NamedTuple):
    """Everything the distiller needs to know about a model, from :func:`describe_stages`."""

    stages: tuple[StageInfo, ...]
    classifier_name: str
    hidden_size: int
    num_classes: int


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


def _checked_max_heads(max_heads: int | None) -> int | None:
    if max_heads is None or (
        isinstance(max_heads, int) and not isinstance(max_heads, bool) and max_heads >= 1
    ):
        return max_heads
    raise ValueError(f"max_heads must be a positive int, or None for every stage, got {max_heads!r}")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def list_stages(model: nn.Module, example_input: torch.Tensor | None = None) -> list[StageInfo]:
    """Every submodule that outputs a feature map or sequence before the classifier runs, in
    run order, with its shape, layout, channels and reduction at ``example_input``.

    Use it to pick ``stage_names`` for a model timm does not describe. Outputs whose first axis
    is not the batch (patches or windows folded into it) are not listed. Layouts are decided as
    :func:`describe_stages` decides them; ``layout`` is ``None`` where the evidence does not
    settle it (pass ``stage_layout`` when tapping such a module).
    """
    model = checked_model(model)
    example = checked_example(model, example_input)
    return _list_stages(model, example, classifier_candidates(model))[0]


def _list_stages(
    model: nn.Module, example: torch.Tensor, candidates: list[str]
) -> tuple[list[StageInfo], Probe, set[str], str]:
    """The candidates, the probe of every module (with the classifier candidates' inputs)
    they were read from, the names of those that are pooled, and the classifier."""
    # The classifier candidates get input hooks only, so the probe keeps their inputs (the
    # pre-logits) under their names, and their place in the run order is where they start.
    names = [n for n in module_names(model) if n not in candidates]
    probe = run_probe(model, names, candidates, example)
    other, scaled = second_probe(model, names, example)
    classifier = choose_classifier(model, candidates, probe, None, example)
    hidden = pre_logits_width(classifier, probe.shapes[classifier])
    before_classifier = probe.order[: probe.order.index(classifier)]
    channels = _feature_channels(model)
    modules = dict(model.named_modules())
    stages: list[StageInfo] = []
    pooled: set[str] = set()
    for name in dict.fromkeys(before_classifier):
        if probe.calls[name] > 1 or name in candidates:  # shared: a hook sees its last call only;
            continue  # a classifier candidate: the probe holds its input, not its output
        if type(modules[name]).__module__ == nn.ZeroPad2d.__module__:  # padding: not a resolution
            continue
        raw = probe.shapes[name]
        shape, element = select_element(name, raw, example.shape[0], channels.get(name))
        if not isinstance(shape, tuple) or len(shape) not in (3, 4):
            continue
        grid, widths = (
            sequence_evidence(model, probe, name, shape, hidden)
            if len(shape) == 3
            else (None, tuple(sorted(layer_widths(modules[name]))))
        )
        evidence = Evidence(other.get(name), scaled, channels.get(name), None, grid, widths)
        try:
            stage = describe_output(model, name, raw, example, evidence)
        except ValueError as error:  # listed all the same, with what could not be decided left None
            if "not the batch" in str(error):
                continue
            stages.append(StageInfo(name, shape, None, None, None, 0, element))
            continue
        stages.append(stage)
        second = other.get(name)
        if element is not None and isinstance(second, list) and len(second) > element:
            second = second[element]
        if is_pooled(stage, second, scaled):
            pooled.add(name)
    return stages, probe, pooled, classifier


def default_stage_names(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    include_last: bool = False,
    max_heads: int | None = DEFAULT_MAX_HEADS,
) -> list[str]:
    """Stages to put heads after, shallow to deep: at most ``max_heads`` of them (``None``:
    every stage found), spread evenly over the depth, without the last stage, which feeds the
    model's own classifier (``include_last`` appends it, e.g. to put attention before the
    final pooling).

    The candidates are timm's ``feature_info`` stages without the stem (reduction < 4). Where
    ``feature_info`` is missing, names modules that do not exist outside ``features_only``
    mode, lists one module twice or names one that does not output a tensor, they come from the
    shapes instead (:mod:`gradual_sd.discovery`; :func:`list_stages` lists them): for a
    hierarchical model the module that finishes each resolution, for an isotropic one (every
    block at one resolution) its blocks.
    """
    model = checked_model(model)
    example = checked_example(model, example_input)
    names, _ = _default_names(model, example, classifier_candidates(model), _checked_max_heads(max_heads))
    return names if include_last else names[:-1]


def _default_names(
    model: nn.Module, example: torch.Tensor, candidates: list[str], max_heads: int | None
) -> tuple[list[str], Probe]:
    """The default stages, the last included, and the dry run (with hooks on those stages and
    on the inputs of ``candidates``) that found them, for :func:`describe_stages` to reuse."""
    entries = [e for e in _feature_entries(model) if e.get("reduction", 4) >= 4]
    names = list(dict.fromkeys(e["module"] for e in entries))
    existing = set(module_names(model))
    if len(names) >= 2 and all(n in existing for n in names):
        probe = run_probe(model, names, candidates, example)
        batch = example.shape[0]
        if all(isinstance(select_element(n, probe.shapes.get(n), batch, None)[0], tuple) for n in names):
            names = sorted(names, key=probe.order.index)
            return [*spread(names[:-1], max_heads), names[-1]], probe
    stages, probe, pooled, classifier = _list_stages(model, example, candidates)
    usable = [s for s in stages if s.layout is not None and s.name not in pooled]
    suggested = choose_stages(usable, max_heads)
    share = _share_after(model, stages, suggested[-1], probe, classifier) if suggested else 0.0
    if len(suggested) < 2 or share > 0.5:
        # Most of the work runs after the deepest resolution, or none was found: the model's
        # stages are the blocks that run there (a Perceiver's latent blocks), if it has a run.
        order = [s.name for s in stages]
        start = order.index(suggested[-1]) + 1 if suggested else 0
        blocks = block_run([s for s in usable if order.index(s.name) >= start])
        if len(blocks) >= 2:
            return [*spread(blocks[:-1], max_heads), blocks[-1]], probe
    if share > 0.5:
        raise ValueError(
            f"cannot find stages of {type(model).__name__} from the shapes: {share:.0%} of its "
            f"parameters run after the deepest output with a resolution, {suggested[-1]!r}, at none "
            "the input decides, and not in a run of blocks. Pass stage_names, shallow to deep "
            "(gradual_sd.list_stages(model) lists every candidate)"
        )
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


def _spread_out(probe: Probe, name: str) -> bool:
    """Whether a module's output has several positions (not a pooled head's (N, C, 1, 1))."""
    shape, _ = select_element(name, probe.shapes.get(name), probe.batch, None)
    return isinstance(shape, tuple) and len(shape) in (3, 4) and sorted(shape[1:])[-2] > 1


def _share_after(
    model: nn.Module, stages: list[StageInfo], last: str, probe: Probe, classifier: str
) -> float:
    """The share of the model's parameters (the classifier's aside) in modules that run after
    stage ``last`` with outputs of several positions at another or no resolution: a
    Perceiver's latent blocks after its input processing."""
    modules = dict(model.named_modules())
    levels = {s.name: _level_of(s) for s in stages}
    start, end = probe.order.index(last), probe.order.index(classifier)
    later = {
        n
        for n in probe.order[start + 1 : end]
        if not n.startswith(last + ".") and _spread_out(probe, n) and levels.get(n) != levels[last]
    }

    def own(names: Iterable[str]) -> int:
        return sum(p.numel() for n in names for p in modules[n].parameters(recurse=False))

    body = own(n for n in modules if n and n != classifier)
    return own(later) / body if body else 0.0


def _level_of(stage: StageInfo) -> int | None:
    if stage.reduction is None or not stage.reduction > 0:
        return None
    return round(math.log2(stage.reduction))


def _stage_infos(
    model: nn.Module,
    names: list[str],
    probe: Probe,
    example: torch.Tensor,
    stage_layout: str | None,
    num_prefix_tokens: int | None,
    hidden: int | None = None,
) -> tuple[StageInfo, ...]:
    if stage_layout is not None and stage_layout not in LAYOUTS:
        raise ValueError(f"stage_layout must be one of {LAYOUTS} or None, got {stage_layout!r}")
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
    spatial = input_positions(example)
    second: tuple[dict[str, object], bool] | None = None
    everything: Probe | None = None
    stages = []
    for name in names:
        shape = probe.shapes[name]
        known = name in channels
        selected, _ = select_element(name, shape, example.shape[0], channels.get(name))
        tokens = isinstance(selected, tuple) and len(selected) == 3
        grid = None
        if tokens and known and reductions.get(name):
            grid = math.prod(int(s // reductions[name]) for s in spatial)
        evidence = Evidence(None, False, channels.get(name), declared if known else None, grid)
        options = dict(stage_layout=stage_layout, num_prefix_tokens=num_prefix_tokens)
        stage = None
        if known:  # timm's feature_info vouches for the module: one probe is enough
            with contextlib.suppress(ValueError):
                stage = describe_output(model, name, shape, example, evidence, **options)
        # A second input size (and one more image) settles what one could not, counts prefix
        # tokens and shows the batch axis; a model that takes one size only has its sequences
        # read against the map they come from.
        if stage is None or (tokens and grid is None and num_prefix_tokens is None):
            if second is None:
                second = second_probe(model, names, example)
            other, scaled = second
            widths = tuple(sorted(layer_widths(find_module(model, name))))
            if tokens and isinstance(selected, tuple):
                if everything is None:
                    everything = run_probe(model, module_names(model), (), example)
                from_map, widths = sequence_evidence(model, everything, name, selected, hidden)
                grid = grid if grid is not None else from_map
            evidence = evidence._replace(
                other=other.get(name), scaled=scaled, grid_tokens=grid, widths=widths
            )
            stage = describe_output(model, name, shape, example, evidence, **options)
        stages.append(stage)
    return tuple(stages)


def describe_outputs(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    stage_layout: Layout | None = None,
    num_prefix_tokens: int | None = None,
    example_input: torch.Tensor | None = None,
    maps_only: bool = False,
) -> tuple[StageInfo, ...]:
    """A :class:`StageInfo` for each named module's output, decided as
    :func:`describe_stages` decides them; the model needs no classifier. ``maps_only`` refuses
    3-D outputs (token or channels-first sequences) before anything is asked about them, for
    callers that only handle feature maps (:func:`~gradual_sd.insert_after`)."""
    model = checked_model(model)
    names = _normalize_names(model, names)
    example = checked_example(model, example_input)
    probe = run_probe(model, names, (), example)
    if maps_only:
        batch = example.shape[0]
        sequences = {}
        for name in names:
            shape = select_element(name, probe.shapes.get(name), batch, None)[0]
            if isinstance(shape, tuple) and len(shape) == 3:
                sequences[name] = shape
        if sequences:
            raise ValueError(
                f"{sequences} output token sequences (N, L, C) or (N, C, L) sequences; attention can "
                "only follow stages that output feature maps (N, C, H, W) or (N, H, W, C)"
            )
    return _stage_infos(model, names, probe, example, stage_layout, num_prefix_tokens)


def describe_stages(
    model: nn.Module,
    stage_names: str | Sequence[str] | None = None,
    *,
    classifier_name: str | None = None,
    stage_layout: Layout | None = None,
    num_prefix_tokens: int | None = None,
    example_input: torch.Tensor | None = None,
    max_heads: int | None = DEFAULT_MAX_HEADS,
) -> ModelStages:
    """Describe the stages to tap and the classifier, raising for anything the heads cannot use.

    Arguments mean what they mean for :class:`~gradual_sd.GradualSelfDistiller`. The stages
    must be listed shallow to deep in the order they run. A stage that returns a tuple or list
    is tapped at its first tensor with the input's batch size, preferring one with the channel
    count ``feature_info`` gives (TNT's blocks return pixel and patch tokens).
    """
    model = checked_model(model)
    max_heads = _checked_max_heads(max_heads)
    example = checked_example(model, example_input)
    candidates = classifier_candidates(model, classifier_name)
    if stage_names is None:
        # The dry run that found the stages also saw their outputs and the classifier's input.
        names, probe = _default_names(model, example, candidates, max_heads)
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
        probe = run_probe(model, names, candidates, example)
    classifier = choose_classifier(model, candidates, probe, classifier_name, example)
    hidden_size = pre_logits_width(classifier, probe.shapes[classifier])
    stages = _stage_infos(model, names, probe, example, stage_layout, num_prefix_tokens, hidden_size)
    order = [name for name in probe.order if name in names]
    if order != names:
        raise ValueError(
            f"stage_names must be listed shallow to deep in the order they run; got {names}, "
            f"but they ran as {order}"
        )
    return ModelStages(stages, classifier, hidden_size, int(probe.logits(model).shape[-1]))
