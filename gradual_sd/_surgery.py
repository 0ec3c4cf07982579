"""Model surgery: put attention (ACAM by default) into an existing model, after named
submodules or in place of its squeeze-excite modules."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

import importlib
import torch
from einops import rearrange
from torch import nn

from ._lookup import find_module
from ._attention import ACAM
from ._inputs import placement
from ._layout import Layout
from ._stages import describe_outputs


# The squeeze-excite classes found by default, by import path. They are imported when
# replace_squeeze_excite runs, so importing the library loads none of their modules.
_SQUEEZE_EXCITE_PATHS = (
    "timm.layers.SEModule",  # also timm.layers.SqueezeExcite
    "timm.layers.EffectiveSEModule",
    "timm.models._efficientnet_blocks.SqueezeExcite",
    "timm.models.hgnet.EseModule",
    "timm.models.senet.SEModule",
    "torchvision.ops.SqueezeExcitation",
)


@functools.cache
def squeeze_excite_kinds() -> Mapping[str, type[nn.Module]]:
    """The squeeze-excite classes ``replace_squeeze_excite`` finds by default, by import path.

    All take and return ``(N, C, H, W)`` maps. timm's channels-last ``SqueezeExciteCl`` is left
    out on purpose: ACAM expects channels on dim 1.
    """
    kinds = {}
    for path in _SQUEEZE_EXCITE_PATHS:
        module, _, name = path.rpartition(".")
        kinds[path] = getattr(importlib.import_module(module), name)
    return MappingProxyType(kinds)


@functools.cache
def _kinds_by_name() -> Mapping[str, type[nn.Module]]:
    """``kinds=`` also takes the path where each listed class is defined (how Python prints it,
    e.g. timm.layers.squeeze_excite.SEModule for timm.layers.SEModule)."""
    kinds = squeeze_excite_kinds()
    return {**{f"{cls.__module__}.{cls.__qualname__}": cls for cls in kinds.values()}, **kinds}


# Where the known SE classes keep their gate (timm, torchvision, timm's hgnet and senet).
_GATE_ATTRIBUTES = ("gate", "scale_activation", "sigmoid")


class ChannelsLast(nn.Module):
    """Run a module made for ``(N, C, H, W)`` maps on ``(N, H, W, C)`` maps (Swin, MambaOut)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.module(rearrange(x, "n h w c -> n c h w")), "n c h w -> n h w c")


def insert_after(
    model: nn.Module,
    names: str | Sequence[str],
    attn_layer: Callable[[int], nn.Module] = ACAM,
    example_input: torch.Tensor | None = None,
    *,
    stage_layout: Layout | None = None,
) -> dict[str, nn.Module]:
    """Insert ``attn_layer(channels)`` after each named submodule, in place.

    Each output's channels and layout are decided as the distiller decides them (see
    :func:`~gradual_sd.describe_stages`), from dry runs of ``example_input`` (default: one zero
    image at the model's configured size) in eval mode without gradients. On an NHWC output the
    attention is wrapped in :class:`ChannelsLast`; sequences (tokens, 1-D maps) are refused. An
    ``nn.Sequential`` target gets the module appended, so the keys of its existing weights do
    not change (``layer4.3`` is added after ResNet's three ``layer4`` blocks); any other target
    is replaced by ``nn.Sequential(target, attention)``, whose weights then live under
    ``<name>.0``. Load pretrained weights before inserting.

    Returns the inserted attention modules by target name.
    """
    if isinstance(names, str):
        names = [names]
    if not list(names):
        raise ValueError("names is empty; name at least one submodule to insert after")
    outputs = describe_outputs(
        model, names, stage_layout=stage_layout, example_input=example_input, maps_only=True
    )
    inserted: dict[str, nn.Module] = {}
    for stage in outputs:
        target = find_module(model, stage.name)
        attention = attn_layer(stage.channels).to(**placement(target))
        module = ChannelsLast(attention) if stage.layout == "NHWC" else attention
        if isinstance(target, nn.Sequential):
            target.append(module)
        else:
            model.set_submodule(stage.name, nn.Sequential(target, module))
        inserted[stage.name] = attention
    return inserted


def replace_squeeze_excite(
    model: nn.Module,
    attn_layer: Callable[..., nn.Module] = ACAM,
    *,
    kinds: Iterable[str | type[nn.Module]] | None = None,
    keep_width: bool = True,
    keep_gate: bool = True,
) -> dict[str, nn.Module]:
    """Replace every squeeze-excite module of ``model`` with ``attn_layer``, in place.

    For models whose constructors do not take ``se_layer=ACAM`` or ``attn_layer=ACAM`` (timm
    MobileNetV3, LCNet, RegNetY, ReXNet, VoVNet, torchvision EfficientNet...). A module is
    squeeze-excite when it is an instance of one of ``kinds``: names from
    :func:`squeeze_excite_kinds` or classes (default: all of :func:`squeeze_excite_kinds`). Each
    is replaced by ``attn_layer(channels, **options)``, where ``channels`` is the input width of
    its first conv or linear layer, on the same device and dtype and in the same train/eval mode.
    Every other module and weight keeps its name and value; the replaced modules' weights are
    dropped, so load pretrained weights first.

    Args:
        keep_width: Pass ``rd_channels=`` the SE's own hidden width, so the swap changes the
            mechanism and not the capacity. SEs without a hidden layer (effective SE) and
            ``keep_width=False`` get ``attn_layer``'s own width (ACAM: ``C/16``, at least 8).
        keep_gate: Pass ``gate_layer=`` the SE's gate class (hard sigmoid in MobileNetV3, LCNet,
            GhostNet, VoVNet), so the swap changes how the channel logits are computed and not
            how they are squashed. ``False`` gives ``attn_layer``'s own gate (ACAM: sigmoid, as
            in the paper).

    Returns the new modules by the name of the module each replaced.
    """
    classes = _squeeze_excite_classes(kinds)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside_found = any(name.startswith(f"{outer}.") for outer in found)
        if name and isinstance(module, classes) and not inside_found:
            found[name] = module
    if not found:
        looked_for = ", ".join(_kind_name(cls) for cls in classes)
        raise ValueError(
            f"{type(model).__name__} has no squeeze-excite module of the kinds looked for "
            f"({looked_for}); pass its class in kinds=, or put attention after stages with "
            "insert_after(model, names)"
        )
    # Build every replacement before swapping any, so an error leaves the model untouched.
    replaced = {name: _build_like(se, name, attn_layer, keep_width, keep_gate) for name, se in found.items()}
    for name, attention in replaced.items():
        model.set_submodule(name, attention)
    return replaced


def _squeeze_excite_classes(kinds: Iterable[str | type[nn.Module]] | None) -> tuple[type[nn.Module], ...]:
    if kinds is None:
        return tuple(squeeze_excite_kinds().values())
    kinds = [kinds] if isinstance(kinds, str | type) else list(kinds)
    if not kinds:
        raise ValueError(f"kinds is empty; give SE classes or names from {list(squeeze_excite_kinds())}")
    classes = []
    for kind in kinds:
        if isinstance(kind, type) and issubclass(kind, nn.Module):
            classes.append(kind)
        elif isinstance(kind, str) and kind in _kinds_by_name():
            classes.append(_kinds_by_name()[kind])
        elif isinstance(kind, str):
            close = difflib.get_close_matches(kind, _kinds_by_name(), n=3, cutoff=0.5)
            hint = f"close matches: {close}; " if close else ""
            raise ValueError(
                f"unknown squeeze-excite kind {kind!r}; {hint}valid: {list(squeeze_excite_kinds())}"
            )
        else:
            raise TypeError(
                f"kinds must hold nn.Module classes or names from squeeze_excite_kinds(), got {kind!r}"
            )
    return tuple(classes)


def _kind_name(cls: type[nn.Module]) -> str:
    """The name ``kinds=`` takes for ``cls``: its key in :func:`squeeze_excite_kinds`, else its
    defining module and qualified name (a class not listed there is passed as the class)."""
    listed = (name for name, known in squeeze_excite_kinds().items() if known is cls)
    return next(listed, f"{cls.__module__}.{cls.__qualname__}")


def _build_like(
    se: nn.Module, name: str, attn_layer: Callable[..., nn.Module], keep_width: bool, keep_gate: bool
) -> nn.Module:
    """``attn_layer`` for the channels of ``se`` (and its width and gate if asked), placed like it."""
    layers = [m for m in se.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ValueError(f"{name!r} ({type(se).__name__}) has no conv or linear layer to read channels from")
    first = layers[0]
    channels, width = (
        (first.in_channels, first.out_channels)
        if isinstance(first, nn.Conv2d)
        else (first.in_features, first.out_features)
    )
    options: dict[str, object] = {}
    if keep_width and len(layers) > 1:  # a single layer (effective SE) has no hidden width
        options["rd_channels"] = width
    gate = next(
        (getattr(se, a) for a in _GATE_ATTRIBUTES if isinstance(getattr(se, a, None), nn.Module)), None
    )
    if keep_gate and gate is not None:
        options["gate_layer"] = type(gate)
    try:
        attention = attn_layer(channels, **options)
    except TypeError as error:
        flags = {"rd_channels": "keep_width=False", "gate_layer": "keep_gate=False"}
        fix = " and ".join(flags[key] for key in options)
        raise TypeError(
            f"attn_layer({channels}, **{options}) failed for {name!r}: {error}; "
            f"for an attn_layer without these arguments pass {fix}"
        ) from error
    return attention.to(**placement(se)).train(se.training)
