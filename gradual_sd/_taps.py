"""Forward hooks on named stages: one mechanism for the distiller's taps, the dry runs and any
model that acts at a stage (an early exit).

:class:`Hooks` calls a function with a named module's output (or, for a stage that returns a
tuple or list, one element of it) and puts back what the function returns, so the same hook
can watch a stage or replace its output. :class:`StageTaps` builds on it to capture stage
outputs per device, only between :meth:`StageTaps.start` and :meth:`StageTaps.stop`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import torch
from einops import rearrange
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._lookup import find_module
from ._layout import Layout

OutputHook = Callable[[str, object], object]  # (name, output or element) -> replacement or None
InputHook = Callable[[str, object], None]  # (name, first positional input or None)


class Tapped(Protocol):
    """What the hooks read of a stage (:class:`~gradual_sd.StageInfo` is one)."""

    name: str
    element: int | None


def tapped_by(model: nn.Module) -> list[str]:
    """Names of ``model``'s submodules that carry a :class:`Hooks` hook ("" is the root)."""
    names = []
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(isinstance(getattr(getattr(h, "func", None), "__self__", None), Hooks) for h in hooks):
            names.append(name)
    return names


class Hooks:
    """Hooks on submodules of ``model``, detached together by :meth:`remove` (or on leaving a
    ``with`` block).

    :meth:`on_output` calls ``fn(name, output)`` after the module runs; a value other than
    ``None`` replaces the output, as a PyTorch forward hook's return value does. With
    ``element``, ``fn`` gets that element of a tuple or list output, and its return value is
    put back in its place. :meth:`on_input` calls ``fn(name, first_input)`` before the module
    runs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[RemovableHandle] = []

    def on_output(self, name: str, fn: OutputHook, element: int | None = None) -> None:
        """Call ``fn`` with module ``name``'s output (its ``element`` for a tuple or list)."""
        self._register(name, partial(self._output, name, fn, element), pre=False)

    def on_input(self, name: str, fn: InputHook) -> None:
        """Call ``fn`` with module ``name``'s first positional input before it runs."""
        self._register(name, partial(self._input, name, fn), pre=True)

    def _register(self, name: str, hook: Callable, pre: bool) -> None:
        try:
            module = find_module(self.model, name)
        except BaseException:
            self.remove()  # a half-hooked model would keep the hooks already placed
            raise
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(hook))

    def _output(
        self, name: str, fn: OutputHook, element: int | None, module: nn.Module, args: tuple, output: object
    ) -> object:
        if element is None or not isinstance(output, (tuple, list)):
            return fn(name, output)
        replacement = fn(name, output[element])
        if replacement is None:
            return None
        items = list(output)
        items[element] = replacement
        return type(output)(items) if isinstance(output, list) else tuple(items)

    def _input(self, name: str, fn: InputHook, module: nn.Module, args: tuple) -> None:
        fn(name, args[0] if args else None)

    @property
    def active(self) -> bool:
        """Whether any hook is still attached."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach every hook; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class StageTaps:
    """Capture the outputs of ``stages`` and the first input of ``input_names`` in one forward.

    ``captured = taps.start(device)``, ``model(x)``, ``taps.stop(device)``: afterwards ``captured``
    maps each name that fired to its tensor (a stage that returns a tuple or list: its
    ``element``). Captures are kept per device, so DataParallel replicas running in threads do not overwrite
    each other, and only between :meth:`start` and :meth:`stop`, so a plain ``model(x)`` or a
    recomputation during backward stores nothing.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Tapped], input_names: Sequence[str] = ()) -> None:
        self.hooks = Hooks(model)
        self._store: dict[str, dict[str, torch.Tensor]] = {}
        self.active = True  # a plain flag: torch.compile cannot inspect hook handles
        for stage in stages:
            self.hooks.on_output(stage.name, self._record, stage.element)
        for name in input_names:
            self.hooks.on_input(name, self._record)

    def _record(self, name: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            store = self._store.get(str(value.device))
            if store is not None:
                store[name] = value

    def start(self, device: str) -> dict[str, torch.Tensor]:
        """Begin recording what the hooks see on ``device``; returns the dict they fill."""
        captured: dict[str, torch.Tensor] = {}
        self._store[device] = captured
        return captured

    def stop(self, device: str) -> None:
        """Stop recording on ``device``; the tensors stay only in the dict ``start`` returned."""
        self._store.pop(device, None)

    def remove(self) -> None:
        """Detach every hook; safe to call more than once."""
        self.hooks.remove()
        self._store.clear()
        self.active = False


def to_feature_map(x: torch.Tensor, layout: Layout, num_prefix_tokens: int = 0) -> torch.Tensor:
    """View a stage output as ``(N, C, H, W)``.

    Token sequences become ``(N, C, L, 1)`` after dropping prefix (class/register) tokens, and
    channels-first sequences (1-D convolutions) ``(N, C, L, 1)`` as they are: the heads only use
    per-position and globally pooled operations, so the grid shape is irrelevant.
    """
    if layout == "NCHW":
        return x
    if layout == "NHWC":
        return rearrange(x, "n h w c -> n c h w")
    if layout == "NCL":
        return rearrange(x[..., num_prefix_tokens:], "n c l -> n c l 1")
    return rearrange(x[:, num_prefix_tokens:], "n l c -> n c l 1")
