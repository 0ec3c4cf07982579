"""Find the layer that turns a model's pre-logits into its logits.

Classifiers come in many shapes: one ``nn.Linear`` (ResNet), a 1x1 convolution (DLA, DPN,
SqueezeNet), a wrapper around a linear layer (timm ``ClassifierHead``, ``NormLinear``, RepViT),
a tuple of heads (distilled DeiT, LeViT, EfficientFormer) or a ``ModuleList`` of them (CrossViT,
EfficientViM). This module lists every linear or 1x1-conv layer inside the classifier; which of
them is *the* classifier is decided by a dry run: the layer whose
output is the returned logits, else the layers the logits depend on (both heads of an averaged
pair: the last to run), never an auxiliary head that runs beside them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._inputs import checked_example
from ._lookup import find_module
from ._records import Output, Probe
from ._probing import checked_model, main_logits, run_probe
from ._taps import Hooks

_CONVENTIONAL_NAMES = ("fc", "classifier", "head")


def is_classifier_layer(module: nn.Module) -> bool:
    """Whether ``module`` can map pre-logits to logits: a linear layer or a 1x1 convolution."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def out_features(module: nn.Module) -> int:
    """Output width of a layer accepted by :func:`is_classifier_layer`."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels  # type: ignore[return-value]


def _layers_within(model: nn.Module, roots: list[nn.Module]) -> list[str]:
    """Names of the classifier layers that are ``roots`` or inside them, in model order."""
    inside = {id(m) for root in roots for m in root.modules()}
    return [name for name, m in model.named_modules() if id(m) in inside and is_classifier_layer(m)]


def classifier_candidates(model: nn.Module, classifier_name: str | None = None) -> list[str]:
    """Linear and 1x1-conv layers that may be the model's classifier, in module order.

    With ``classifier_name``, the layers at or inside that module. Otherwise those inside
    timm's ``get_classifier()`` (a module, a tuple or a ``ModuleList``), else inside a module
    called ``fc``, ``classifier`` or ``head``, else every such layer of the model.
    """
    model_name = type(model).__name__
    if classifier_name is not None:
        if not isinstance(classifier_name, str):
            raise TypeError(f"classifier_name must be a str, got {type(classifier_name).__name__}")
        root = find_module(model, classifier_name)
        layers = _layers_within(model, [root])
        if not layers:
            raise ValueError(
                f"classifier_name={classifier_name!r} is a {type(root).__name__} with no nn.Linear "
                "or 1x1 nn.Conv2d inside; name the layer that outputs the logits"
            )
        return layers

    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        roots = list(classifier) if isinstance(classifier, (tuple, list, nn.ModuleList)) else [classifier]
        roots = [r for r in roots if isinstance(r, nn.Module)]
        layers = _layers_within(model, roots)
        if layers:
            return layers
        described = type(classifier).__name__
        if all(isinstance(r, nn.Identity) for r in roots):
            raise ValueError(
                f"{model_name}.get_classifier() is {described}: the model has no classifier. "
                "Create it with num_classes > 0, or pass classifier_name"
            )
        raise ValueError(
            f"{model_name}.get_classifier() is {described} with no nn.Linear or 1x1 nn.Conv2d "
            "inside; pass classifier_name"
        )

    modules = dict(model.named_modules())
    for name in _CONVENTIONAL_NAMES:
        if name in modules:
            layers = _layers_within(model, [modules[name]])
            if layers:
                return layers
    layers = _layers_within(model, [model])
    if not layers:
        raise ValueError(
            f"{model_name} has no nn.Linear or 1x1 nn.Conv2d that could be its classifier; "
            "pass classifier_name"
        )
    return layers


def contributing_layers(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """Which of the layers ``names`` the model's returned logits depend on, from one eval-mode
    forward with each layer's output made a leaf of the autograd graph: a layer is returned
    when the logits have a gradient with respect to its output. An auxiliary head that runs
    beside the classifier has none; both heads of an averaged pair have one."""
    leaves: dict[str, torch.Tensor] = {}

    def make_leaf(name: str, output: object) -> object:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            leaves[name] = output.detach().requires_grad_()
            return leaves[name].clone()  # not the leaf itself: the model may work on it in place
        return None

    was_training = model.training
    try:
        with Hooks(model) as hooks, torch.enable_grad():
            for name in names:
                hooks.on_output(name, make_leaf)
            model.eval()
            logits = main_logits(model(example))
            ran = [n for n in names if n in leaves]
            if logits is None or not logits.requires_grad or not ran:
                return []
            grads = torch.autograd.grad(logits.sum(), [leaves[n] for n in ran], allow_unused=True)
    finally:
        model.train(was_training)
    return [n for n, g in zip(ran, grads) if g is not None]


def _is_output(value: object, logits: torch.Tensor) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.numel() == logits.numel()
        and torch.equal(value.reshape(logits.shape), logits)
    )


class Classifier(NamedTuple):
    """The layer that outputs a model's logits, its pre-logits width and its class count."""

    name: str
    hidden_size: int
    num_classes: int


def choose_classifier(
    model: nn.Module, candidates: list[str], probe: Probe, classifier_name: str | None, example: torch.Tensor
) -> Classifier:
    """The classifier, from a dry run's ``probe`` (one that kept the logits): of the candidate
    layers that ran with ``num_classes`` outputs, the one whose output is the returned logits;
    else those the logits depend on (an averaged pair of heads: one more run, with gradients),
    the last to run; with ``classifier_name``, the last to run. Its pre-logits width is read
    from the input the probe saw it take."""
    name = _classifier_layer(model, candidates, probe, classifier_name, example)
    return Classifier(name, pre_logits_width(name, probe.inputs[name]), int(probe.logits.shape[-1]))


def _classifier_layer(
    model: nn.Module, candidates: list[str], probe: Probe, classifier_name: str | None, example: torch.Tensor
) -> str:
    logits = probe.logits
    classes = int(logits.shape[-1])
    modules = dict(model.named_modules())
    fitting = [n for n in probe.starts if n in candidates and out_features(modules[n]) == classes]
    if not fitting:
        widths = {n: out_features(modules[n]) for n in candidates}
        where = f"classifier_name={classifier_name!r}" if classifier_name else "the model's classifier"
        raise ValueError(
            f"none of the layers in {where} ran with {classes} outputs (the model's logits); "
            f"layers and widths: {widths}. Pass classifier_name, the layer that outputs the logits"
        )
    exact = [n for n in fitting if _is_output(probe.watched_outputs.get(n), logits)]
    if exact:
        return exact[-1]
    if classifier_name is not None:
        return fitting[-1]
    contributing = contributing_layers(model, fitting, example)
    if contributing:
        return contributing[-1]
    raise ValueError(
        f"the model's logits are neither the output of nor computed from any of the layers {fitting} "
        f"that ran with {classes} outputs (each may be an auxiliary head); pass classifier_name, the "
        "layer that outputs the logits"
    )


def find_classifier_name(
    model: nn.Module, classifier_name: str | None = None, example_input: torch.Tensor | None = None
) -> str:
    """Name of the layer that outputs the model's logits: among the linear and 1x1-conv layers
    of its classifier (:func:`~gradual_sd._classifier.classifier_candidates`) that ran with
    ``num_classes`` outputs in one dry run, the one whose output is the returned logits; else
    the last to run of those the logits are computed from (both heads of an averaged pair). An
    auxiliary head the logits do not depend on is never chosen; where none is left, the error
    lists the candidates."""
    model = checked_model(model)
    candidates = classifier_candidates(model, classifier_name)
    example = checked_example(model, example_input)
    probe = run_probe(model, example, candidates, logits=True)
    return _classifier_layer(model, candidates, probe, classifier_name, example)


def pre_logits(x: torch.Tensor) -> torch.Tensor:
    """The classifier's input as ``(N, D)`` pre-logits: an ``(N, D)`` vector itself, the
    average of a 1x1-conv classifier's ``(N, D, H, W)`` map (the conv is linear, so this is the
    vector it maps), or a decoder's one query ``(N, 1, D)`` (Perceiver)."""
    if x.dim() == 4:
        return x.mean((2, 3))
    if x.dim() == 3 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 2:
        return x
    raise ValueError(f"pre-logits must be (N, D), (N, 1, D) or (N, D, H, W), got {tuple(x.shape)}")


def pre_logits_width(name: str, seen: Output) -> int:
    """The width of classifier ``name``'s pre-logits, from what its input was in a dry run."""
    shape = seen.tensor
    try:
        if shape is None:
            raise ValueError(f"pre-logits must be a tensor, got {seen}")
        return int(pre_logits(torch.empty(shape, device="meta")).shape[1])
    except ValueError as error:
        raise ValueError(
            f"classifier {name!r} must take (N, D) or (N, 1, D) pre-logits or an (N, D, H, W) map, "
            f"got {seen}; pass classifier_name, the layer that outputs the logits"
        ) from error
