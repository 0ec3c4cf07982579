"""Choose the default stages to tap from the records of the dry runs: pure functions of records.

Where timm's ``feature_info`` names stages the first dry run shows as maps or sequences, they
are the candidates (:func:`feature_info_stages`). Otherwise every output that finished before
the classifier started is listed (:func:`listing`) and the stages are found from the shapes.

A stage is a stage's output: the module that finishes a resolution on the model's main path.
Per resolution, the outermost module holding the most of that resolution's work is chosen (a
stage container over the stem, the patch embedding, or the next stage's first convolution that
still runs at the old resolution), ties going to the one that finishes last. Outputs that the
main path does not continue from are left out: a module followed by a finer resolution that
does not contain it (a strided key/value projection inside attention, MobileViT's unfolded
patches). Hierarchical models get one stage per resolution, the stem left out where enough
deeper resolutions follow; isotropic models, whose every block has one resolution, get blocks;
a model doing most of its work after its last resolution (a Perceiver's latent blocks) gets the
blocks that run there. Either way at most ``max_heads`` intermediate stages, spread evenly over
the depth, as the paper's three auxiliary classifiers are.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple, Protocol

from ._layout import LayoutError
from ._outputs import NotAStage, Observation, Reason, Tapped, describe
from ._records import FeatureInfo, StageInfo
from ._tuning import (
    DEEP_RESOLUTIONS,
    FINER,
    MAX_SHARE_AFTER,
    MIN_BLOCKS,
    MIN_CONTAINER,
    STEM_REDUCTION,
)


class Listed(Protocol):
    """What discovery reads of a listed output (:class:`~gradual_sd.StageInfo` is one)."""

    name: str
    shape: tuple[int, ...]
    layout: str | None
    reduction: float | None


class Ran(NamedTuple):
    """A module that ran before the classifier, for :func:`share_after`."""

    name: str
    parameters: int  # its own, not its submodules'
    spread_out: bool  # its output is a 3-D or 4-D batch-first tensor with several positions


def feature_info_stages(
    records: Mapping[str, Observation], info: FeatureInfo, max_heads: int | None
) -> list[str] | None:
    """timm's ``feature_info`` stages without the stem, the last included, at most ``max_heads``
    before it, in run order; ``None`` where it names fewer than two or one the first dry run
    did not show as a map or sequence (a module of ``features_only`` mode, a module list)."""
    deep = (n for n, r in info.entries if (r if r is not None else STEM_REDUCTION) >= STEM_REDUCTION)
    names = list(dict.fromkeys(deep))  # each module once, in entry order
    if len(names) < 2 or not all(n in records and isinstance(records[n].tapped, Tapped) for n in names):
        return None
    order = list(records)
    names = sorted(names, key=order.index)
    return _with_final(names, max_heads)


def listing(
    records: Sequence[Observation], skip: Collection[str], parameters: Mapping[str, int]
) -> tuple[list[StageInfo], list[Ran]]:
    """Every output of ``records`` (those that finished before the classifier started),
    described (``layout`` ``None`` where the evidence does not settle it or it is pooled), and
    every module that ran there. Modules in ``skip`` (the classifier's layers, whose input is
    the pre-logits, and padding) and modules that ran more than once (a hook sees only their
    last call) are not listed."""
    listed: list[StageInfo] = []
    ran: list[Ran] = []
    for obs in records:
        tapped = obs.tapped if isinstance(obs.tapped, Tapped) else None
        spread_out = tapped is not None and sum(size > 1 for size in tapped.shape[1:]) > 1
        ran.append(Ran(obs.name, parameters[obs.name], spread_out))
        if tapped is None or obs.calls > 1 or obs.name in skip:
            continue
        undecided = StageInfo(obs.name, tapped.shape, None, None, None, 0, tapped.element)
        try:
            listed.append(describe(obs))
        except NotAStage as error:
            if error.reason is Reason.POOLED:
                listed.append(undecided)
        except LayoutError:  # listed all the same, with what could not be decided left None
            listed.append(undecided)
    return listed, ran


def spread(names: Sequence[str], max_heads: int | None) -> list[str]:
    """At most ``max_heads`` of the intermediate stages ``names`` (shallow to deep), evenly
    spaced over the depth they and the final stage after them span; all with ``None``.

    With twelve blocks (eleven intermediate), three heads go after blocks 3, 6 and 9.
    """
    names = list(names)
    if max_heads is None or len(names) <= max_heads:
        return names
    positions = len(names) + 1  # the final stage is the last position
    picked = [math.floor(k * positions / (max_heads + 1) + 0.5) - 1 for k in range(1, max_heads + 1)]
    return [names[i] for i in sorted(set(picked))]


def _with_final(names: Sequence[str], max_heads: int | None) -> list[str]:
    return [*spread(names[:-1], max_heads), names[-1]]


def _level(stage: Listed) -> int | None:
    """The stage's resolution as a power of two of its reduction; ``None`` without one."""
    if stage.reduction is None or not stage.reduction > 0:
        return None
    return round(math.log2(stage.reduction))


def _inside(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _main_path(stages: list[Listed]) -> list[Listed]:
    """Drop outputs the main path does not continue from: those followed by a finer resolution
    in a module that does not contain them, and the steps of a convolutional patch embedding
    (maps inside a module that outputs tokens at a coarser resolution, as LeViT's stem)."""
    kept = []
    for i, stage in enumerate(stages):
        finer = stage.reduction / FINER  # type: ignore[operator]
        later = stages[i + 1 :]
        if any(o.reduction < finer and not _inside(stage.name, o.name) for o in later):  # type: ignore[operator]
            continue
        if any(_embeds(o, stage) for o in later):
            continue
        kept.append(stage)
    return kept


def _embeds(outer: Listed, stage: Listed) -> bool:
    """Whether ``outer`` contains ``stage`` and turns it into another kind of output (a map
    into tokens) at a coarser resolution: ``stage`` is a step of an embedding, not a stage."""
    coarser = outer.reduction > stage.reduction * FINER  # type: ignore[operator]
    return (
        coarser
        and _inside(stage.name, outer.name)
        and stage.name != outer.name
        and len(outer.shape) != len(stage.shape)
    )


def _outermost_with_most_work(members: list[Listed]) -> tuple[str, int]:
    """The member holding the most other members, the last to finish among equals, and that count."""
    names = [m.name for m in members]
    outermost = [n for n in names if not any(_inside(n, o) and n != o for o in names)]
    scores = {o: sum(_inside(n, o) for n in names) for o in outermost}
    best = max(scores.values())
    return [o for o in outermost if scores[o] == best][-1], best


def block_run(members: Sequence[Listed]) -> list[str]:
    """The longest run of numbered siblings with one output shape (``layers.0``, ``layers.1``...)."""
    shapes = {m.name: m.shape for m in members}
    runs: dict[str, list[tuple[int, str]]] = {}
    for name in shapes:
        parent, _, index = name.rpartition(".")
        if index.isdigit():
            runs.setdefault(parent, []).append((int(index), name))
    best: list[str] = []
    for blocks in runs.values():
        blocks.sort()
        run: list[str] = []
        for position, (index, name) in enumerate(blocks):
            follows = position > 0 and index == blocks[position - 1][0] + 1
            if follows and shapes[name] == shapes[run[-1]]:
                run.append(name)
            else:
                run = [name]
            if len(run) > len(best):
                best = list(run)
    return best


def choose_stages(stages: Sequence[Listed], max_heads: int | None) -> list[str]:
    """Default stages from candidates listed in the order they finished (every one a
    batch-first, unpooled output of a module that ran once): at most ``max_heads``
    intermediate stages, then the last stage, which feeds the classifier. Fewer than two
    stages found: ``[]``."""
    path = _main_path([s for s in stages if s.reduction is not None and s.reduction > 0])
    levels: dict[int, list[Listed]] = {}
    for stage in path:
        levels.setdefault(_level(stage), []).append(stage)  # type: ignore[arg-type]
    order = [s.name for s in path]
    chosen = sorted(
        ((*_outermost_with_most_work(members), level) for level, members in levels.items()),
        key=lambda c: order.index(c[0]),
    )
    # Containers of several modules over single layers (a stem's convolutions). One container
    # resolution with a run of blocks is an isotropic model, whatever its stem did.
    containers = [c for c in chosen if c[1] >= MIN_CONTAINER]
    if len(containers) == 1 or len(levels) == 1:
        blocks = block_run(levels[(containers or chosen)[0][2]])
        if len(blocks) >= MIN_BLOCKS:
            return _with_final(blocks, max_heads)
    chosen = containers if len(containers) >= 2 else chosen
    deep = [c for c in chosen if c[2] >= math.log2(STEM_REDUCTION)]
    chosen = deep if len(deep) >= DEEP_RESOLUTIONS else chosen
    names = [c[0] for c in chosen]
    return _with_final(names, max_heads) if len(names) >= 2 else []


def share_after(ran: Sequence[Ran], stages: Sequence[Listed], last: str, body: int) -> float:
    """The share of ``body`` (the parameters of every module but the classifier) held by the
    modules that run after stage ``last`` with outputs of several positions at another or no
    resolution: a Perceiver's latent blocks after its input processing.

    Args:
        ran: The modules that ran before the classifier, in the order they finished.
        stages: The listed outputs.
        last: The deepest stage found.
        body: The parameters of every module but the classifier.
    """
    levels = {s.name: _level(s) for s in stages}
    names = [r.name for r in ran]
    later = [
        r
        for r in ran[names.index(last) + 1 :]
        if not _inside(r.name, last) and r.spread_out and levels.get(r.name) != levels[last]
    ]
    return sum(r.parameters for r in later) / body if body else 0.0


def default_stages(
    listed: Sequence[Listed], ran: Sequence[Ran], body: int, max_heads: int | None, model_name: str
) -> list[str]:
    """The default stages, the last included, from the outputs a dry run listed, or a
    ``ValueError`` that asks for ``stage_names``.

    Args:
        listed: Every candidate in the order it finished; those with a ``layout`` are usable.
        ran: The modules that ran before the classifier (:func:`share_after`).
        body: The parameters of every module but the classifier.
        max_heads: At most this many intermediate stages (``None``: all).
        model_name: The model's class name, for the errors.
    """
    usable = [s for s in listed if s.layout is not None]
    suggested = choose_stages(usable, max_heads)
    share = share_after(ran, listed, suggested[-1], body) if suggested else 0.0
    if len(suggested) < 2 or share > MAX_SHARE_AFTER:
        # Most of the work runs after the deepest resolution, or none was found: the model's
        # stages are the blocks that run there (a Perceiver's latent blocks), if it has a run.
        order = [s.name for s in listed]
        start = order.index(suggested[-1]) + 1 if suggested else 0
        blocks = block_run([s for s in usable if order.index(s.name) >= start])
        if len(blocks) >= MIN_BLOCKS:
            return _with_final(blocks, max_heads)
    if share > MAX_SHARE_AFTER:
        raise ValueError(
            f"cannot find stages of {model_name} from the shapes: {share:.0%} of its parameters run "
            f"after the deepest output with a resolution, {suggested[-1]!r}, at none the input "
            "decides, and not in a run of blocks. Pass stage_names, shallow to deep "
            "(gradual_sd.list_stages(model) lists every candidate)"
        )
    if len(suggested) < 2:
        names = {s.name for s in listed}
        outermost = [s for s in listed if not any(a in names for a in _ancestors(s.name))]
        listing = ", ".join(f"{s.name} {s.shape}" for s in outermost[-12:]) or "none"
        raise ValueError(
            f"cannot find stages of {model_name} to put heads after; pass stage_names, shallow to "
            f"deep. gradual_sd.list_stages(model) lists every candidate; the outermost are: {listing}"
        )
    return suggested


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
