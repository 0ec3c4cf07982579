"""Dry runs that show what a model's modules output: the example input, the probes, and the
checks on what a model must be (a plain module that takes images and returns logits).

A probe runs the model once in eval mode without gradients with hooks on named modules. A
second probe at a larger input and one more image is the evidence for which axes are spatial
(they grow), how many tokens are prefix tokens (they do not) and which axis is the batch; a
model that takes one input size gets the second probe at its own size, for the batch alone.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .taps import probe_outputs

__all__ = [
    "Probe",
    "SCALE",
    "checked_model",
    "default_example_input",
    "input_positions",
    "is_token_ids",
    "main_logits",
    "probe",
    "second_probe",
    "takes_token_ids",
]

SCALE = 2  # the second dry run's input is this many times larger along each spatial axis


class Probe(NamedTuple):
    """What one dry run saw."""

    # name -> output shape; for a tuple or list, a list of its elements' shapes (or type
    # names); for anything else, its type name. Inputs of the classifier candidates too.
    shapes: dict[str, object]
    order: list[str]  # names in the order their hooks fired
    output: object  # what the model returned
    calls: Counter[str]  # how often each module ran
    classifier_outputs: dict[str, object]  # each classifier candidate's output tensor
    batch: int  # the example's batch size

    def logits(self, model: nn.Module) -> torch.Tensor:
        logits = main_logits(self.output)
        if logits is None or logits.dim() != 2:
            raise ValueError(_not_logits(model, self.output))
        return logits


def _global_pool_off(model: nn.Module) -> bool:
    """Whether a timm model was created with ``global_pool=''`` (no pooling before its head)."""
    pool = getattr(model, "global_pool", None)
    return pool == "" or getattr(pool, "pool_type", None) == ""


_POOL_ADVICE = (
    "it was created with global_pool='', which leaves its feature map unpooled before the "
    "classifier: create it with global_pool='avg' (the default)"
)


def _not_logits(model: nn.Module, output: object) -> str:
    name = type(model).__name__
    if isinstance(output, torch.Tensor):
        got = tuple(output.shape)
        if _global_pool_off(model):
            return f"{name} returned {got} in eval mode, not (N, num_classes) logits: {_POOL_ADVICE}"
        if output.dim() >= 3:
            return (
                f"{name} returned {got} in eval mode, a feature map or token sequence, not "
                "(N, num_classes) logits: it has no pooled classification head. For timm, create the "
                "model with num_classes > 0 (a model with no classification head, such as a vision "
                "encoder, needs one added), or wrap it so it takes images and returns logits"
            )
        return (
            f"{name} returned {got} in eval mode, not (N, num_classes) logits. The distiller needs a "
            "classifier: for timm, create the model with num_classes > 0 (a model with no "
            "classification head, such as a vision encoder, needs one added)"
        )
    return (
        f"{name} returned a {type(output).__name__} with no (N, num_classes) logits tensor in eval "
        "mode (a .logits field, the tensor itself or a tuple's first element). Wrap it so it takes "
        "images and returns logits, e.g. a module whose forward is `return model(images)[key]`"
    )


def main_logits(output: object) -> torch.Tensor | None:
    """The main logits of a model's output: the tensor itself, a ``.logits`` field (Hugging
    Face, torchvision GoogLeNet and Inception in training), the first field of a Hugging Face
    output without one where it is ``(N, K)``, or the first tensor of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):  # a Hugging Face ModelOutput that names its logits otherwise
        first = next(iter(output.values()), None)
        is_logits = isinstance(first, torch.Tensor) and first.dim() == 2
        return first if is_logits and hasattr(output, "to_tuple") else None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def checked_model(model: object) -> nn.Module:
    """``model`` itself, or a ``TypeError`` for what is not a plain module the distiller can
    tap: not a module, or a ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel``
    wrapper (hooks on the wrapped module's submodules would see a compiled graph's or a
    replica's calls, not the training forward; wrap the inner model and compile or
    parallelise the distiller instead)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    compiled = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    if isinstance(model, compiled):
        raise TypeError(
            "model is a torch.compile() module; wrap the original model (model._orig_mod) and compile "
            "after wrapping: torch.compile(GradualSelfDistiller(model._orig_mod))"
        )
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, parallel):
        kind = type(model).__name__
        raise TypeError(
            f"model is a {kind} container; wrap the model inside it (model.module) and put the "
            f"distiller in the container after wrapping: {kind}(GradualSelfDistiller(model.module))"
        )
    return model


def _as_pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def _configs(model: nn.Module) -> list[object]:
    """The model's Hugging Face config and, for a two-tower model, its vision config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    vision = getattr(config, "vision_config", None)
    return [config] + ([vision] if vision is not None else [])


def takes_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a wrapper holds as ``.model``) is a Hugging Face model
    whose main input is token ids (ImageGPT reads an image as ids of colour clusters)."""
    inner = getattr(model, "model", None)
    return any(
        getattr(m, "main_input_name", None) == "input_ids" for m in (model, inner) if isinstance(m, nn.Module)
    )


def is_token_ids(example: torch.Tensor) -> bool:
    """An ``(N, L)`` batch of integer token ids (not an image or a float sequence)."""
    return example.dim() == 2 and not example.is_floating_point() and not example.is_complex()


def input_positions(example: torch.Tensor) -> tuple[int, ...]:
    """The input's sizes along the axes that grow with it: ``(H, W)`` of an image, ``L`` of a
    sequence or of a batch of token ids."""
    return tuple(example.shape[1:] if is_token_ids(example) else example.shape[2:])


def _token_length(model: nn.Module) -> int | None:
    for config in _configs(model):
        for key in ("n_positions", "max_position_embeddings"):
            length = getattr(config, key, None)
            if isinstance(length, int) and length > 0:
                return length
    return None


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A one-image zero batch at the size the model was built for.

    A Hugging Face model whose main input is token ids (ImageGPT) gets one sequence of token 0
    as long as its config's ``n_positions`` (``max_position_embeddings``): a whole image.

    The size is a Hugging Face ``config.image_size`` (or its ``vision_config``'s), else a
    configured ``img_size``/``image_size`` of a submodule (timm ViT and Swin patch embeddings,
    torchvision ViT), else timm's ``pretrained_cfg['input_size']``, else 224x224; the channels
    are the config's ``num_channels``, else the first convolution's input channels, else 3. A
    model whose first convolution is 1-D has no default: pass an ``(N, C, L)`` example_input.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    length = _token_length(model) if takes_token_ids(model) else None
    if length is not None:
        return torch.zeros(1, length, dtype=torch.long, device=device)
    first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if isinstance(first_conv, (nn.Conv1d, nn.Conv3d)):
        kind = type(first_conv).__name__
        raise ValueError(
            f"{type(model).__name__}'s first convolution is an {kind}, so it does not take (N, C, H, W) "
            "images of a size the model records; pass example_input, a batch the model accepts"
        )
    size = channels = None
    for config in _configs(model):
        size = size or _as_pair(getattr(config, "image_size", None))
        channels = channels or getattr(config, "num_channels", None)
    for module in model.modules():
        if size is not None:
            break
        size = _as_pair(getattr(module, "img_size", None)) or _as_pair(getattr(module, "image_size", None))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None and "input_size" in cfg:
        size = tuple(cfg["input_size"][1:])
    height, width = size or (224, 224)
    if not isinstance(channels, int) or channels < 1:
        channels = first_conv.in_channels if first_conv is not None else 3
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return torch.zeros(1, channels, height, width, device=device, dtype=dtype)


def checked_example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """``example_input``, or the default one; an ``(N, C, L)`` or ``(N, C, H, W)`` batch, or
    ``(N, L)`` token ids for a model that takes them."""
    if example_input is None:
        return default_example_input(model)
    tokens = (
        isinstance(example_input, torch.Tensor) and is_token_ids(example_input) and takes_token_ids(model)
    )
    if not tokens and (not isinstance(example_input, torch.Tensor) or example_input.dim() not in (3, 4)):
        got = (
            tuple(example_input.shape)
            if isinstance(example_input, torch.Tensor)
            else type(example_input).__name__
        )
        raise ValueError(
            "example_input must be an (N, C, H, W) image batch or an (N, C, L) sequence batch (or "
            f"(N, L) token ids for a model whose main input they are), got {got}"
        )
    return example_input


def _required_inputs(model: nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]


def _inputs(model: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def _first_input(model: nn.Module) -> str | None:
    return next(iter(_inputs(model)), None)


def _failure_advice(model: nn.Module, example: torch.Tensor) -> str:
    """What to change when the model fails on the example: its inputs, or the example."""
    required = _required_inputs(model)
    if _global_pool_off(model):
        return f"It fails because {_POOL_ADVICE}"
    if _first_input(model) == "input_ids":
        if "pixel_values" in _inputs(model):
            return (
                "Its forward takes input_ids (token ids) and pixel_values (images): wrap it so it "
                "takes one batch and returns logits"
            )
        if is_token_ids(example) or len(required) > 1:
            return (
                f"Its forward needs {required or ['input_ids', '...']}, more than one batch of "
                "token ids: wrap it so it takes one batch and returns logits"
            )
        return (
            "Its forward takes input_ids (token ids), not images: pass example_input as an (N, L) "
            "integer batch of the ids its processor makes, or wrap it so it takes images and "
            "returns logits"
        )
    if len(required) > 1:
        return (
            f"Its forward needs {required}: wrap it so it takes images and returns logits, e.g. a "
            "module whose forward calls the model with the other inputs it needs"
        )
    if example.dim() == 4:
        built = default_example_input(model).shape[-2:]
        if tuple(built) != tuple(example.shape[-2:]):
            return (
                f"It was built for {tuple(built)} inputs: pass example_input at that size, or build "
                f"the model for {tuple(example.shape[-2:])} (timm: img_size=, Hugging Face: image_size=)"
            )
    return "Pass example_input, a batch the model accepts, or wrap it so it takes images and returns logits"


def probe(model: nn.Module, names: Sequence[str], inputs: Sequence[str], example: torch.Tensor) -> Probe:
    """One eval-mode dry run with hooks on ``names`` (outputs) and ``inputs`` (the classifier
    candidates: their first input and their output).

    A failure inside the model becomes a ``ValueError`` that says what to change.
    """
    try:
        seen, outputs, output, calls = probe_outputs(model, names, example, input_names=inputs)
    except Exception as error:  # the model's own failure, whatever its type
        raise ValueError(
            f"{type(model).__name__} failed on the example input of shape {tuple(example.shape)}: "
            f"{type(error).__name__}: {error}. {_failure_advice(model, example)}"
        ) from error
    shapes = {name: shape_of(value) for name, value in seen.items()}
    return Probe(shapes, list(seen), output, calls, outputs, int(example.shape[0]))


def shape_of(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [shape_of(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value]
    return type(value).__name__


def second_probe(
    model: nn.Module, names: Sequence[str], example: torch.Tensor
) -> tuple[dict[str, object], bool]:
    """Output shapes at an input ``SCALE`` times larger with one more image, and whether the
    larger size ran; a model that takes one size only is probed at its own size with one more
    image (evidence for the batch axis alone). ``{}`` where neither runs."""
    batch = example.shape[0] + 1
    positions = input_positions(example)
    channels = example.shape[1 : example.dim() - len(positions)]  # none for token ids
    bigger = (batch, *channels, *(s * SCALE for s in positions))
    for shape, scaled in ((bigger, True), ((batch, *example.shape[1:]), False)):
        other = torch.zeros(shape, device=example.device, dtype=example.dtype)
        try:
            return probe(model, names, (), other).shapes, scaled
        except ValueError:
            continue
    return {}, False
