"""Find submodules by dotted name, with errors that list the names a model does have."""

from __future__ import annotations

import difflib

from torch import nn


def module_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule of ``model`` (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


class UnknownModuleError(KeyError):
    """A module name the model does not have. A ``KeyError`` whose message prints unquoted."""

    def __str__(self) -> str:
        return str(self.args[0])


def find_module(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule called ``name`` or raise a ``KeyError`` naming close matches."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"module names must be non-empty strings, got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = module_names(model)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        top_level = [n for n in names if "." not in n]
        hint = f"close matches: {close}" if close else f"top-level modules: {top_level}"
        raise UnknownModuleError(f"{type(model).__name__} has no submodule {name!r}; {hint}") from None
