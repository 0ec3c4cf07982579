"""Forward hooks that capture the outputs of named stages during one forward pass.

Captured tensors are kept per device, so DataParallel replicas running in threads do not
overwrite each other, and only between :meth:`StageTaps.start` and :meth:`StageTaps.stop`, so a
plain ``model(x)`` call or a recomputation during backward stores nothing.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Literal
from collections.abc import Iterator, Sequence

import torch
from einops import rearrange
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._lookup import find_module

__all__ = ["Layout", "StageTaps", "to_feature_map", "probe_outputs"]

Layout = Literal["NCHW", "NHWC", "NLC"]
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NLC")


class StageTaps:
    """Hooks on ``names`` (outputs) and, optionally, on ``input_names`` (first positional input).

    Use ``with taps.capture(device) as captured: model(x)``; afterwards ``captured`` maps each
    name that fired to its tensor. :meth:`remove` detaches every hook.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], input_names: Sequence[str] = ()) -> None:
        self.names = tuple(names)
        self.input_names = tuple(input_names)
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

    Token sequences become ``(N, C, L, 1)`` after dropping prefix (class/register) tokens: the
    heads only use per-position and globally pooled operations, so the grid shape is irrelevant.
    """
    if layout == "NCHW":
        return x
    if layout == "NHWC":
        return rearrange(x, "n h w c -> n c h w")
    return rearrange(x[:, num_prefix_tokens:], "n l c -> n c l 1")


def infer_layout(shape: torch.Size, name: str, hint: str | None = None) -> Layout:
    """Layout of a stage output from its shape; 4-D outputs are NCHW unless ``hint`` says NHWC."""
    if len(shape) == 3:
        return "NLC"
    if len(shape) == 4:
        return "NHWC" if hint == "NHWC" else "NCHW"
    raise ValueError(
        f"stage {name!r} outputs a tensor of shape {tuple(shape)}; expected a feature map "
        "(N, C, H, W), (N, H, W, C) or a token sequence (N, L, C)"
    )


def channels_of(shape: torch.Size, layout: Layout) -> int:
    """Channel count of a stage output of ``shape`` in ``layout``."""
    return int(shape[1] if layout == "NCHW" else shape[-1])


def probe_outputs(
    model: nn.Module,
    names: Sequence[str],
    example_input: torch.Tensor,
    input_names: Sequence[str] = (),
) -> tuple[dict[str, object], object]:
    """Run ``model`` once in eval mode without gradients; return what each tap saw, in the
    order the taps first fired, and the model's output. The train/eval state is restored."""
    taps = StageTaps(model, names, input_names)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), taps.capture(example_input.device) as captured:
            output = model(example_input)
            seen: dict[str, object] = dict(captured)
    finally:
        model.train(was_training)
        taps.remove()
    return seen, output
