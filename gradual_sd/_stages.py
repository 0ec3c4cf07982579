"""What a model looks like to the distiller: its stages, their layouts, and its classifier.

At most two dry runs in eval mode without gradients (:class:`~gradual_sd._probing.DryRuns`; the
second only where the first leaves something open) describe every tapped stage, in the spirit
of timm's ``FeatureInfo``: :func:`describe_stages` is what
:class:`~gradual_sd.GradualSelfDistiller` and :func:`~gradual_sd.insert_after` build on, and
:func:`list_stages` shows the candidates of a model that timm does not describe (torchvision,
hand-written models). One output's record and description are :mod:`gradual_sd.outputs`', the
choice of default stages :mod:`gradual_sd.discovery`'s, the classifier's
:mod:`gradual_sd.classifier`'s; this module puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ._lookup import find_module
from ._classifier import choose_classifier, classifier_candidates, find_classifier_name, pre_logits_width
from ._discovery import Ran, default_stages, spread
from ._evidence import FeatureInfo, observe
from ._inputs import checked_example, default_example_input
from ._layout import Layout, LayoutError
from ._outputs import NotAStage, Reason, StageInfo, describe, select
from ._probing import DryRuns, checked_model, main_logits
from ._tuning import DEFAULT_MAX_HEADS, STEM_REDUCTION

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


class _Survey(NamedTuple):
    """The dry runs of one construction and what they settled first: the classifier."""

    model: nn.Module
    runs: DryRuns
    info: FeatureInfo
    candidates: list[str]
    classifier: str
    hidden: int


def _survey(
    model: nn.Module, example_input: torch.Tensor | None, classifier_name: str | None = None
) -> _Survey:
    model = checked_model(model)
    example = checked_example(model, example_input)
    candidates = classifier_candidates(model, classifier_name)
    runs = DryRuns(model, example, candidates)
    classifier = choose_classifier(model, candidates, runs.first, classifier_name, example)
    hidden = pre_logits_width(classifier, runs.first.inputs[classifier])
    return _Survey(model, runs, FeatureInfo.of(model), candidates, classifier, hidden)


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


def _is_padding(module: nn.Module) -> bool:
    """Padding changes a map's size, not its resolution."""
    return type(module).__module__ == nn.ZeroPad2d.__module__


def _listing(survey: _Survey) -> tuple[list[StageInfo], list[Ran]]:
    """Every output that finished before the classifier started, described (``layout`` ``None``
    where the evidence does not settle it or it is pooled), and every module that ran there."""
    model, runs = survey.model, survey.runs
    first = runs.first
    modules = dict(model.named_modules())
    listed: list[StageInfo] = []
    ran: list[Ran] = []
    for name in first.order[: first.starts[survey.classifier]]:
        obs = observe(model, runs, name, survey.info, second=True, hidden=survey.hidden)
        try:
            shape, element = select(obs)
        except NotAStage:
            shape = None
        own = sum(p.numel() for p in modules[name].parameters(recurse=False))
        ran.append(Ran(name, own, shape is not None and sum(size > 1 for size in shape[1:]) > 1))
        # A module that runs twice shows its last call only; the candidates' inputs are the
        # pre-logits, their outputs the logits.
        if shape is None or obs.calls > 1 or name in survey.candidates or _is_padding(modules[name]):
            continue
        try:
            listed.append(describe(obs))
        except NotAStage as error:
            if error.reason is Reason.POOLED:
                listed.append(StageInfo(name, shape, None, None, None, 0, element))
        except LayoutError:  # listed all the same, with what could not be decided left None
            listed.append(StageInfo(name, shape, None, None, None, 0, element))
    return listed, ran


def list_stages(model: nn.Module, example_input: torch.Tensor | None = None) -> list[StageInfo]:
    """Every submodule that outputs a feature map or sequence before the classifier runs, in
    run order, with its shape, layout, channels and reduction at ``example_input``.

    Use it to pick ``stage_names`` for a model timm does not describe. Outputs whose first axis
    is not the batch (patches or windows folded into it) are not listed. Layouts are decided as
    :func:`describe_stages` decides them; ``layout`` is ``None`` where the evidence does not
    settle it (pass ``stage_layout`` when tapping such a module) or where the output is pooled
    to one position (no stage).
    """
    return _listing(_survey(model, example_input))[0]


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
    max_heads = _checked_max_heads(max_heads)
    names = _default_names(_survey(model, example_input), max_heads)
    return names if include_last else names[:-1]


def _taps_features(survey: _Survey, name: str) -> bool:
    first = survey.runs.first
    if name not in first.outputs:
        return False
    try:
        select(observe(survey.model, survey.runs, name, survey.info, second=False))
    except NotAStage:
        return False
    return True


def _default_names(survey: _Survey, max_heads: int | None) -> list[str]:
    """The default stages, the last included: timm's ``feature_info`` stages where they can be
    tapped, else those :func:`~gradual_sd._discovery.default_stages` finds from the shapes."""
    names = survey.info.stages(STEM_REDUCTION)
    if len(names) >= 2 and all(_taps_features(survey, n) for n in names):
        order = survey.runs.first.order
        names = sorted(names, key=order.index)
        return [*spread(names[:-1], max_heads), names[-1]]
    listed, ran = _listing(survey)
    body = sum(
        p.numel()
        for name, module in survey.model.named_modules()
        if name and name != survey.classifier
        for p in module.parameters(recurse=False)
    )
    return default_stages(listed, ran, body, max_heads, type(survey.model).__name__)


def _stage_infos(
    model: nn.Module,
    runs: DryRuns,
    info: FeatureInfo,
    names: list[str],
    stage_layout: str | None,
    num_prefix_tokens: int | None,
    hidden: int | None = None,
) -> tuple[StageInfo, ...]:
    """The named stages described; from the first dry run alone where ``feature_info`` vouches
    for a stage and that settles it, else with the second."""
    first = runs.first
    missing = [name for name in names if name not in first.outputs]
    if missing:
        raise NotAStage(Reason.DID_NOT_RUN, f"modules {missing} did not run in a forward pass of the model")
    repeated = {name: first.calls[name] for name in names if first.calls[name] > 1}
    if repeated:
        raise NotAStage(
            Reason.RAN_TWICE,
            f"modules {repeated} run more than once in a forward pass (times shown), so a hook on "
            "them sees only the last call; pass stage_names that run once (see list_stages)",
        )
    options = dict(stage_layout=stage_layout, num_prefix_tokens=num_prefix_tokens)
    stages = []
    for name in names:
        obs = observe(model, runs, name, info, second=False, hidden=hidden)
        stage = None
        if obs.channels is not None:  # timm's feature_info vouches for the module
            try:
                stage = describe(obs, **options)
            except (NotAStage, LayoutError):
                pass
        unmeasured = stage is not None and len(stage.shape) == 3 and obs.grid_tokens is None
        if stage is None or (unmeasured and num_prefix_tokens is None):
            # The second run settles what the first could not, counts prefix tokens and shows
            # the batch axis.
            obs = observe(model, runs, name, info, second=True, hidden=hidden)
            stage = describe(obs, **options)
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
    runs = DryRuns(model, checked_example(model, example_input))
    info = FeatureInfo.of(model)
    if maps_only:
        sequences = {}
        for name in names:
            if name in runs.first.outputs:
                try:
                    shape, _ = select(observe(model, runs, name, info, second=False))
                except NotAStage:
                    continue
                if len(shape) == 3:
                    sequences[name] = shape
        if sequences:
            raise ValueError(
                f"{sequences} output token sequences (N, L, C) or (N, C, L) sequences; attention can "
                "only follow stages that output feature maps (N, C, H, W) or (N, H, W, C)"
            )
    return _stage_infos(model, runs, info, names, stage_layout, num_prefix_tokens)


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
    names = None if stage_names is None else _normalize_names(model, stage_names)
    survey = _survey(model, example_input, classifier_name)
    if names is None:
        names = _default_names(survey, max_heads)[:-1]
    overlap = [n for n in names if n in survey.candidates]
    if overlap:
        raise ValueError(
            f"{overlap} is the model's classifier (the deepest head); stage_names lists only the "
            "stages before it"
        )
    first = survey.runs.first
    stages = _stage_infos(
        survey.model, survey.runs, survey.info, names, stage_layout, num_prefix_tokens, survey.hidden
    )
    order = [name for name in first.order if name in names]
    if order != names:
        raise ValueError(
            f"stage_names must be listed shallow to deep in the order they run; got {names}, "
            f"but they ran as {order}"
        )
    return ModelStages(stages, survey.classifier, survey.hidden, int(first.logits(survey.model).shape[-1]))
