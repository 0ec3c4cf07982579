"""The construction check: can samples leave at each tapped stage without changing the others'
answers? Refuses models where a later stage reads more than the tapped stage's output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .._inputs import default_example_input, placement, takes_token_ids
from .._probing import main_logits
from ._routing import Route, difference

if TYPE_CHECKING:
    from ._model import EarlyExitModel


def check_exits(exits: EarlyExitModel, batch: torch.Tensor) -> None:
    """Let sample 0 leave at each stage in turn and check the others' logits are unchanged."""
    heads, names = len(exits.heads), exits.stage_names
    with torch.no_grad():
        reference = main_logits(exits.model(batch))
        if not isinstance(reference, torch.Tensor) or reference.dim() != 2:
            raise ValueError(
                "early exit needs (N, num_classes) logits from the model (a tensor, a .logits "
                "field or a tuple's first element)"
            )
        watch = Route(batch.shape[0], batch.device, [False] * heads, lambda k, z: z)
        exits.run(batch, watch)
        if watch.fired != list(range(heads)):
            ran = [names[k] for k in watch.fired]
            raise ValueError(f"each stage must run once, in order {list(names)}; they ran as {ran}")
        for k, name in enumerate(names):
            first = lambda j, z: torch.arange(z.shape[0], device=z.device) == 0  # noqa: E731
            route = Route(batch.shape[0], batch.device, [j == k for j in range(heads)], first)
            try:
                logits = exits.run(batch, route)
            except (RuntimeError, ValueError) as error:
                raise ValueError(
                    f"samples cannot leave at stage {name!r}: the rest of the model fails on "
                    f"the smaller batch ({error}). A later stage probably also reads a tensor "
                    "from before this stage (cross-stage links as in HRNet or DenseNet-style "
                    "models) or reshapes to the input's batch size; tap only stages after which "
                    "nothing earlier is read"
                ) from error
            changed = difference(logits, reference[1:])
            if changed is not None:
                raise ValueError(
                    f"samples cannot leave at stage {name!r}: when one sample leaves there, "
                    f"the others' logits change by up to {changed:.3g}. A later stage reads "
                    "more than this stage's output (a cross-stage link, or an operation that "
                    "mixes the batch); tap only stages after which nothing earlier is read"
                )


def example_of_shape(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor:
    """One zero input of ``shape`` (without the batch axis) on the model's device, token ids for
    a model that takes them, else in the model's precision; the default example where ``shape``
    is ``None``."""
    if shape is None:
        return default_example_input(model)
    where = placement(model)
    if takes_token_ids(model):
        where["dtype"] = torch.long
    return torch.zeros((1, *shape), **where)


def probe_batch(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    """A batch of 4 different inputs: the given one if it has at least 3 samples, else random
    images shaped like it (default: as :func:`~gradual_sd._inputs.default_example_input`)."""
    if example is not None and example.shape[0] >= 3:
        return example
    if example is None:
        example = default_example_input(model)
    if not example.is_floating_point():
        raise ValueError("pass an example_input with at least 3 samples for a non-float input")
    shape, device, dtype = tuple(example.shape[1:]), example.device, example.dtype
    generator = torch.Generator().manual_seed(0)
    return torch.randn((4, *shape), generator=generator).to(device=device, dtype=dtype)
