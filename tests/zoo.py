"""One small model per timm model family, chosen programmatically, for the zoo tests.

A family is a module of ``timm.models``. Within it, names are ranked by the size words timm
uses (``test``, ``atto``, ``femto``... ``small``), and the smallest by parameter count of the
first few is taken; counting builds each candidate on the meta device, which allocates nothing.
"""

from __future__ import annotations

import functools
import re

import timm
import torch
from timm.models import _registry

SIZE_WORDS = (
    "test", "atto", "femto", "pico", "nano", "xxtiny", "xx", "xxs", "mini", "xtiny", "x", "xs",
    "tiny", "ti", "t", "small", "s",
)  # fmt: skip
CANDIDATES_PER_FAMILY = 3


def _size_rank(name: str) -> tuple[int, int, str]:
    tokens = re.split(r"[_\-]", name)
    ranks = [
        i
        for i, word in enumerate(SIZE_WORDS)
        for token in tokens
        if token == word or (token.startswith(word) and token[len(word) :].isdigit())
    ]
    return (min(ranks, default=len(SIZE_WORDS)), len(name), name)


def parameter_count(name: str) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=5)
    return sum(p.numel() for p in model.parameters())


def timm_families() -> list[str]:
    """The modules of ``timm.models`` that register a model; not those of other packages that
    register models with timm (the training example's small ResNets), whose registration
    depends on what was imported before."""
    return sorted(
        family
        for family in _registry.list_modules()
        if any(
            _registry.model_entrypoint(name).__module__.startswith("timm.")
            for name in timm.list_models(module=family)
        )
    )


@functools.cache
def smallest_in(family: str) -> str:
    """The model a zoo test builds for ``family``: of the first few names by size word, the one
    with the fewest parameters. Chosen when the family's test runs, not at collection, so that
    a run that deselects the zoo (the quick tier) builds none of the candidates."""
    names = sorted(timm.list_models(module=family), key=_size_rank)[:CANDIDATES_PER_FAMILY]
    return min(names, key=lambda n: (parameter_count(n), n))


def train_two_steps(distiller, images: torch.Tensor, targets: torch.Tensor) -> None:
    """Two SGD steps of a zoo model's distiller: finite losses, and after the first backward
    every head parameter has a gradient (a head off the graph would not)."""
    optimizer = torch.optim.SGD(distiller.parameters(), lr=1e-3)
    distiller.train()
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = distiller(images, targets)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        if step == 0:
            missing = [n for n, p in distiller.heads.named_parameters() if p.grad is None]
            assert not missing, f"head parameters without a gradient: {missing}"
        optimizer.step()
