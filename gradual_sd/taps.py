"""Forward hooks that capture the outputs of named stages during one forward pass.

Captured tensors are kept per device, so DataParallel replicas running in threads do not
overwrite each other, and only between :meth:`StageTaps.start` and :meth:`StageTaps.stop`, so a
plain ``model(x)`` call or a recomputation during backward stores nothing.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from functools import partial
from collections.abc import Iterator, Mapping, Sequence

import torch
from einops import rearrange
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._lookup import find_module
from .layout import Layout

__all__ = ["StageTaps", "to_feature_map", "probe_outputs", "tapped_by"]


def tapped_by(model: nn.Module) -> list[str]:
    """Names of ``model``'s submodules that carry a :class:`StageTaps` hook ("" is the root)."""
    names = []
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(isinstance(getattr(getattr(h, "func", None), "__self__", None), StageTaps) for h in hooks):
            names.append(name)
    return names


class StageTaps:
    """Hooks on ``names`` (outputs) and, optionally, on ``input_names`` (first positional input).

    Use ``with taps.capture(device) as captured: model(x)``; afterwards ``captured`` maps each
    name that fired to its tensor. A stage that returns a tuple or list is recorded as its
    element ``elements[name]`` (PiT and MViTv2 stages return ``(x, extra)``, TNT's
    ``(pixels, patches)``); with ``elements=None`` the whole output is kept, for probing.
    :meth:`remove` detaches every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        input_names: Sequence[str] = (),
        elements: Mapping[str, int] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.input_names = tuple(input_names)
        self.elements = None if elements is None else dict(elements)
        self.calls: Counter[str] = Counter()  # outputs recorded per name, for probing
        self._store: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        self.active = True  # a plain flag: torch.compile cannot inspect hook handles
        try:
            for name in self.names:
                hook = partial(self._record_output, name)
                self._handles.append(find_module(model, name).register_forward_hook(hook))
            for name in self.input_names:
                hook = partial(self._record_input, name)
                self._handles.append(find_module(model, name).register_forward_pre_hook(hook))
        except BaseException:
            self.remove()
            raise

    def _put(self, name: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            store = self._store.get(str(value.device))
            if store is not None:
                store[name] = value
        else:
            # A tuple, dict or None: kept so that probing can report what the stage returned.
            for store in self._store.values():
                store[name] = value  # type: ignore[assignment]

    def _record_output(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        if self._store:
            self.calls[name] += 1
            if self.elements is not None and isinstance(output, (tuple, list)):
                output = output[self.elements.get(name, 0)]
            self._put(name, output)

    def _record_input(self, name: str, module: nn.Module, args: tuple) -> None:
        if self._store:
            self._put(name, args[0] if args else None)

    def start(self, device: str) -> dict[str, torch.Tensor]:
        """Begin recording what the hooks see on ``device``; returns the dict they fill."""
        captured: dict[str, torch.Tensor] = {}
        self._store[device] = captured
        return captured

    def stop(self, device: str) -> None:
        """Stop recording on ``device``; the tensors stay only in the dict ``start`` returned."""
        self._store.pop(device, None)

    @contextlib.contextmanager
    def capture(self, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """``start``/``stop`` as a context manager."""
        captured = self.start(str(device))
        try:
            yield captured
        finally:
            self.stop(str(device))

    def remove(self) -> None:
        """Detach every hook; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
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


def probe_outputs(
    model: nn.Module,
    names: Sequence[str],
    example_input: torch.Tensor,
    input_names: Sequence[str] = (),
) -> tuple[dict[str, object], dict[str, object], object, Counter[str]]:
    """Run ``model`` once in eval mode without gradients; return what each tap saw, in the
    order the taps first fired (outputs of ``names``, first inputs of ``input_names``), the
    outputs of ``input_names``, the model's output, and how often each output tap fired.
    The train/eval state is restored."""
    taps = StageTaps(model, names, input_names)
    outputs = StageTaps(model, input_names)
    was_training = model.training
    try:
        model.eval()
        device = example_input.device
        with torch.no_grad(), taps.capture(device) as captured, outputs.capture(device) as produced:
            output = model(example_input)
            seen: dict[str, object] = dict(captured)
            made: dict[str, object] = dict(produced)
    finally:
        model.train(was_training)
        taps.remove()
        outputs.remove()
    return seen, made, output, taps.calls
