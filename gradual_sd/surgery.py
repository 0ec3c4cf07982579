"""Model surgery: put a module (ACAM by default) after named submodules of an existing model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._lookup import find_module
from .attention import ACAM
from .taps import probe_outputs

__all__ = ["insert_after"]


def insert_after(
    model: nn.Module,
    names: str | Sequence[str],
    attn_layer: Callable[[int], nn.Module] = ACAM,
    example_input: torch.Tensor | None = None,
) -> dict[str, nn.Module]:
    """Insert ``attn_layer(channels)`` after each named submodule, in place.

    Channels are read from one forward pass of ``example_input`` (default: one 3x224x224 zero
    image) in eval mode without gradients. An ``nn.Sequential`` target gets the module appended,
    so the keys of its existing weights do not change (``layer4.3`` is added after ResNet's three
    ``layer4`` blocks); any other target is replaced by ``nn.Sequential(target, attention)``,
    whose weights then live under ``<name>.0``. Load pretrained weights before inserting.

    Returns the inserted modules by target name.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("names is empty; name at least one submodule to insert after")
    targets = {name: find_module(model, name) for name in names}
    if example_input is None:
        param = next(model.parameters(), None)
        example_input = torch.zeros(1, 3, 224, 224, device=param.device if param is not None else None)
    seen, _ = probe_outputs(model, names, example_input)
    inserted: dict[str, nn.Module] = {}
    for name, target in targets.items():
        output = seen.get(name)
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"{name!r} does not output an (N, C, H, W) feature map (got {got}); attention "
                "can only follow convolutional stages"
            )
        param = next(target.parameters(), None)
        attention = attn_layer(int(output.shape[1]))
        if param is not None:
            attention.to(device=param.device, dtype=param.dtype)
        if isinstance(target, nn.Sequential):
            target.append(attention)
        else:
            model.set_submodule(name, nn.Sequential(target, attention))
        inserted[name] = attention
    return inserted
