"""What a model looks like to the distiller: its stages, their layouts, and its classifier.

Construction reads top to bottom in :func:`discover`, in the spirit of timm's
``build_model_with_cfg``: the first dry run and the classifier it shows; one record per module
made of it (``_outputs.observe``); the stages, named or found (timm's ``feature_info`` where the
first run shows them, else from the shapes at two sizes); each stage described from its record.
The dry runs happen here and nowhere else below it: the first always, the second only where the
first leaves something open, at most once. Every step it calls returns a value and calls
nothing back. :func:`describe_stages` is what :class:`~gradual_sd.GradualSelfDistiller` and
:func:`~gradual_sd.insert_after` build on; :func:`list_stages` shows the candidates of a model
that timm does not describe (torchvision, hand-written models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ._classifier import Classifier, choose_classifier, classifier_candidates
from ._discovery import default_stages, feature_info_stages, listing
from ._inputs import checked_example
from ._layout import Layout, LayoutError
from ._lookup import find_module
from ._outputs import NotAStage, Observation, Reason, Tapped, describe
from ._records import ModelFacts, Probe, StageInfo
from ._outputs import observe, seen_again
from ._probing import checked_model, probe_again, read_model, run_probe
from ._tuning import DEFAULT_MAX_HEADS

# The tests import these two from here.
from ._inputs import default_example_input  # noqa: F401, E402
from ._probing import main_logits  # noqa: F401, E402


class ModelStages(NamedTuple):
    """Everything the distiller needs to know about a model, from :func:`describe_stages`."""

    stages: tuple[StageInfo, ...]
    classifier_name: str
    hidden_size: int
    num_classes: int


class _Survey(NamedTuple):
    """The first dry run of one construction, the classifier it shows, and the records of it."""

    first: Probe
    facts: ModelFacts
    records: dict[str, Observation]
    candidates: list[str]
    classifier: Classifier | None  # none asked for (insert_after)


def discover(
    model: nn.Module,
    example: torch.Tensor,
    stage_names: str | Sequence[str] | None = None,
    *,
    classifier_name: str | None = None,
    stage_layout: Layout | None = None,
    num_prefix_tokens: int | None = None,
    max_heads: int | None = DEFAULT_MAX_HEADS,
) -> ModelStages:
    """:func:`describe_stages` for a model and an example already checked."""
    max_heads = _checked_max_heads(max_heads)
    names = None if stage_names is None else _normalize_names(model, stage_names)
    survey = _first_run(model, example, classifier_name)
    full = None  # the records with the second run's outputs, once it has run
    if names is None:
        names, full = _default_names(model, example, survey, max_heads)
        names = names[:-1]
    overlap = [n for n in names if n in survey.candidates]
    if overlap:
        raise ValueError(
            f"{overlap} is the model's classifier (the deepest head); stage_names lists only the "
            "stages before it"
        )
    options = dict(stage_layout=stage_layout, num_prefix_tokens=num_prefix_tokens)
    stages = _described(model, example, survey, full, names, options)
    order = [name for name in survey.first.order if name in names]
    if order != names:
        raise ValueError(
            f"stage_names must be listed shallow to deep in the order they run; got {names}, "
            f"but they ran as {order}"
        )
    return ModelStages(stages, *survey.classifier)


def _first_run(
    model: nn.Module, example: torch.Tensor, classifier_name: str | None = None, *, classifier: bool = True
) -> _Survey:
    """The first dry run, the classifier it shows (where one is asked for), and a record per
    module."""
    candidates = classifier_candidates(model, classifier_name) if classifier else []
    first = run_probe(model, example, candidates, logits=classifier)
    chosen = choose_classifier(model, candidates, first, classifier_name, example) if classifier else None
    facts = read_model(model)
    records = observe(first, facts, chosen.hidden_size if chosen is not None else None)
    return _Survey(first, facts, records, candidates, chosen)


def _second_run(model: nn.Module, example: torch.Tensor, survey: _Survey) -> dict[str, Observation]:
    """The records with the second dry run's outputs: the run at a larger size with one more
    image, for where the first leaves something open."""
    return seen_again(survey.records, probe_again(model, example, survey.first.positions))


def _default_names(
    model: nn.Module, example: torch.Tensor, survey: _Survey, max_heads: int | None
) -> tuple[list[str], dict[str, Observation] | None]:
    """The default stages, the last included: timm's ``feature_info`` stages where the first
    run shows them, else those found from the shapes at two sizes; and the records with the
    second run where it ran."""
    names = feature_info_stages(survey.records, survey.facts.info, max_heads)
    if names is not None:
        return names, None
    full = _second_run(model, example, survey)
    listed, ran = _listing(survey, full)
    classifier = survey.classifier.name  # type: ignore[union-attr]
    body = sum(n for name, n in survey.facts.parameters.items() if name and name != classifier)
    return default_stages(listed, ran, body, max_heads, type(model).__name__), full


def _listing(survey: _Survey, full: dict[str, Observation]) -> tuple[list[StageInfo], list]:
    """Every output that finished before the classifier started, described, and every module
    that ran there (``_discovery.listing``)."""
    first = survey.first
    before = [full[name] for name in first.order[: first.starts[survey.classifier.name]]]  # type: ignore[union-attr]
    return listing(before, {*survey.candidates, *survey.facts.padding}, survey.facts.parameters)


def _described(
    model: nn.Module,
    example: torch.Tensor,
    survey: _Survey,
    full: dict[str, Observation] | None,
    names: list[str],
    options: dict,
) -> tuple[StageInfo, ...]:
    """The named stages described: from the first dry run alone where it settles a stage, else
    with the second, which runs here if it has not."""
    records = survey.records
    missing = [name for name in names if name not in records]
    if missing:
        raise NotAStage(Reason.DID_NOT_RUN, f"modules {missing} did not run in a forward pass of the model")
    repeated = {name: records[name].calls for name in names if records[name].calls > 1}
    if repeated:
        raise NotAStage(
            Reason.RAN_TWICE,
            f"modules {repeated} run more than once in a forward pass (times shown), so a hook on "
            "them sees only the last call; pass stage_names that run once (see list_stages)",
        )
    settled = [_settled_by_first_run(records[name], options) for name in names]
    if full is None and None in settled:
        full = _second_run(model, example, survey)
    stages = []
    for name, stage in zip(names, settled):
        stages.append(stage if stage is not None else describe(full[name], **options))  # type: ignore[index]
    return tuple(stages)


def _settled_by_first_run(obs: Observation, options: dict) -> StageInfo | None:
    """The stage the first dry run settles alone: one timm's ``feature_info`` vouches for, whose
    layout that evidence decides and, for tokens, whose patch grid is known or whose prefix the
    user gave; else ``None``, for the second run to settle."""
    if obs.channels is None:
        return None
    try:
        stage = describe(obs, **options)
    except (NotAStage, LayoutError):
        return None
    unmeasured = len(stage.shape) == 3 and obs.grid_tokens is None
    return None if unmeasured and options["num_prefix_tokens"] is None else stage


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
    return discover(
        model,
        checked_example(model, example_input),
        stage_names,
        classifier_name=classifier_name,
        stage_layout=stage_layout,
        num_prefix_tokens=num_prefix_tokens,
        max_heads=max_heads,
    )


def list_stages(model: nn.Module, example_input: torch.Tensor | None = None) -> list[StageInfo]:
    """Every submodule that outputs a feature map or sequence before the classifier runs, in
    run order, with its shape, layout, channels and reduction at ``example_input``.

    Use it to pick ``stage_names`` for a model timm does not describe. Outputs whose first axis
    is not the batch (patches or windows folded into it) are not listed. Layouts are decided as
    :func:`describe_stages` decides them; ``layout`` is ``None`` where the evidence does not
    settle it (pass ``stage_layout`` when tapping such a module) or where the output is pooled
    to one position (no stage).
    """
    model = checked_model(model)
    example = checked_example(model, example_input)
    survey = _first_run(model, example)
    return _listing(survey, _second_run(model, example, survey))[0]


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
    shapes instead (:func:`list_stages` lists them): for a hierarchical model the module that
    finishes each resolution, for an isotropic one (every block at one resolution) its blocks.
    """
    max_heads = _checked_max_heads(max_heads)
    model = checked_model(model)
    example = checked_example(model, example_input)
    names, _ = _default_names(model, example, _first_run(model, example), max_heads)
    return names if include_last else names[:-1]


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
    survey = _first_run(model, example, classifier=False)
    if maps_only:
        tapped = {name: survey.records[name].tapped for name in names if name in survey.records}
        sequences = {n: t.shape for n, t in tapped.items() if isinstance(t, Tapped) and len(t.shape) == 3}
        if sequences:
            raise ValueError(
                f"{sequences} output token sequences (N, L, C) or (N, C, L) sequences; attention can "
                "only follow stages that output feature maps (N, C, H, W) or (N, H, W, C)"
            )
    options = dict(stage_layout=stage_layout, num_prefix_tokens=num_prefix_tokens)
    return _described(model, example, survey, None, names, options)
