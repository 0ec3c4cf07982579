"""Choose the default stages to tap from the modules a dry run listed.

A stage is a stage's output: the module that finishes a resolution on the model's main path.
Per resolution, the outermost module holding the most of that resolution's work is chosen (a
stage container over the stem, the patch embedding, or the next stage's first convolution that
still runs at the old resolution), ties going to the one that finishes last. Outputs that the
main path does not continue from are left out: a module followed by a finer resolution that
does not contain it (a strided key/value projection inside attention, MobileViT's unfolded
patches). Hierarchical models get one stage per resolution, the stem (reduction < 4) left out
where at least two deeper resolutions precede the last; isotropic models, whose every block has
one resolution, get blocks. Either way at most ``max_heads`` intermediate stages, spread evenly
over the depth, as the paper's three auxiliary classifiers are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

__all__ = ["DEFAULT_MAX_HEADS", "block_run", "choose_stages", "spread"]

DEFAULT_MAX_HEADS = 3  # the paper's auxiliary classifiers: one after each of ResNet's first three stages


class Listed(Protocol):
    """What discovery reads of a listed stage (:class:`~gradual_sd.StageInfo`)."""

    name: str
    shape: tuple[int, ...]
    reduction: float | None


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


def _level(stage: Listed) -> int:
    return round(math.log2(stage.reduction))  # type: ignore[arg-type]


def _inside(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _main_path(stages: list[Listed]) -> list[Listed]:
    """Drop outputs the main path does not continue from: those followed by a finer resolution
    in a module that does not contain them, and the steps of a convolutional patch embedding
    (maps inside a module that outputs tokens at a coarser resolution, as LeViT's stem)."""
    kept = []
    for i, stage in enumerate(stages):
        finer = stage.reduction / _FINER  # type: ignore[operator]
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
    coarser = outer.reduction > stage.reduction * _FINER  # type: ignore[operator]
    return (
        coarser
        and _inside(stage.name, outer.name)
        and stage.name != outer.name
        and len(outer.shape) != len(stage.shape)
    )


# A resolution counts as finer from this factor on, so that a convolution's padding (a map a
# pixel or two larger) is no finer resolution.
_FINER = 1.5


def _outermost_with_most_work(members: list[Listed]) -> tuple[str, int]:
    """The member holding the most other members, the last to finish among equals, and that count."""
    names = [m.name for m in members]
    outermost = [n for n in names if not any(_inside(n, o) and n != o for o in names)]
    scores = {o: sum(_inside(n, o) for n in names) for o in outermost}
    best = max(scores.values())
    return [o for o in outermost if scores[o] == best][-1], best


def block_run(members: list[Listed]) -> list[str]:
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
        levels.setdefault(_level(stage), []).append(stage)
    order = [s.name for s in path]
    chosen = sorted(
        ((*_outermost_with_most_work(members), level) for level, members in levels.items()),
        key=lambda c: order.index(c[0]),
    )
    # Containers of several modules over single layers (a stem's convolutions). One container
    # resolution with a run of blocks is an isotropic model, whatever its stem did.
    containers = [c for c in chosen if c[1] >= 2]
    if len(containers) == 1 or len(levels) == 1:
        blocks = block_run(levels[(containers or chosen)[0][2]])
        if len(blocks) >= 2:
            return [*spread(blocks[:-1], max_heads), blocks[-1]]
    chosen = containers if len(containers) >= 2 else chosen
    # The stem (reduction < 4) is left out where at least two deeper resolutions precede the last.
    deep = [c for c in chosen if c[2] >= 2]
    chosen = deep if len(deep) >= 3 else chosen
    names = [c[0] for c in chosen]
    return [*spread(names[:-1], max_heads), names[-1]] if len(names) >= 2 else []
