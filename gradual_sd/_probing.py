"""Everything discovery learns by running or reading the model, as the records of ``_records``;
and the checks on what a model must be (a plain module that takes images and returns logits).

A dry run (:func:`run_probe`) runs the model once in eval mode without gradients, with hooks on
every module that record the shapes of what it returns. Construction needs at most two: the
first at the example input, and where that leaves something open, :func:`probe_again`, at an
input ``SCALE`` times larger with one more image (or, for a model that takes one size, one more
image only), which shows which axes are spatial (they grow), which tokens are prefix tokens
(they do not) and which axis is the batch. :func:`read_model` reads what the model says of its
modules without running it.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._inputs import default_example_input, input_positions, is_token_ids
from ._records import FeatureInfo, ModelFacts, Output, Probe
from ._taps import Hooks
from ._tuning import SCALE


def output_of(value: object) -> Output:
    """The record of what a module returned: its shapes, never its values."""
    if isinstance(value, torch.Tensor):
        return Output("tensor", (tuple(value.shape),))
    if isinstance(value, (tuple, list)):
        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value)
        return Output(type(value).__name__, shapes)
    return Output(type(value).__name__)


def run_probe(
    model: nn.Module,
    example: torch.Tensor,
    watched: Sequence[str] = (),
    *,
    logits: bool = False,
    scaled: bool = False,
) -> Probe:
    """One eval-mode dry run with hooks on every module (their outputs' shapes) and on
    ``watched`` (their first input's shape and their output tensor). The train/eval state is
    restored; a failure inside the model becomes a ``ValueError`` that says what to change, as
    does, with ``logits``, a model that returns no ``(N, num_classes)`` logits."""
    outputs: dict[str, Output] = {}
    inputs: dict[str, Output] = {}
    starts: dict[str, int] = {}
    calls: Counter[str] = Counter()
    watched_outputs: dict[str, torch.Tensor] = {}

    def finished(name: str, value: object) -> None:
        calls[name] += 1
        outputs[name] = output_of(value)  # the last call's; the place is the first's
        if name in watched and isinstance(value, torch.Tensor):
            watched_outputs[name] = value

    def started(name: str, value: object) -> None:
        inputs[name] = output_of(value)
        starts.setdefault(name, len(outputs))

    was_training = model.training
    hooks = Hooks(model)
    try:
        for name, _ in model.named_modules():
            if name:
                hooks.on_output(name, finished)
        for name in watched:
            hooks.on_input(name, started)
        model.eval()
        with torch.no_grad():
            returned = model(example)
    except Exception as error:  # the model's own failure, whatever its type
        raise ValueError(
            f"{type(model).__name__} failed on the example input of shape {tuple(example.shape)}: "
            f"{type(error).__name__}: {error}. {_failure_advice(model, example)}"
        ) from error
    finally:
        hooks.remove()
        model.train(was_training)
    found = main_logits(returned)
    if logits and (found is None or found.dim() != 2):
        raise ValueError(_not_logits(model, returned))
    shape, positions = tuple(example.shape), input_positions(example)
    return Probe(outputs, inputs, starts, calls, found, watched_outputs, shape, positions, scaled)


def probe_again(model: nn.Module, example: torch.Tensor, positions: Sequence[int]) -> Probe | None:
    """The second dry run: one more item at an input ``SCALE`` times larger along each of the
    example's ``positions`` axes (those that grow with it), else at the example's size;
    ``None`` where neither runs."""
    batch = example.shape[0] + 1
    channels = example.shape[1 : example.dim() - len(positions)]  # none for token ids
    bigger = (batch, *channels, *(s * SCALE for s in positions))
    for shape, scaled in ((bigger, True), ((batch, *example.shape[1:]), False)):
        other = torch.zeros(shape, device=example.device, dtype=example.dtype)
        try:
            return run_probe(model, other, scaled=scaled)
        except ValueError:
            continue
    return None


def read_model(model: nn.Module) -> ModelFacts:
    """What ``model`` says of its modules without running: timm's ``feature_info`` and
    ``output_fmt``, each module's layer widths and own parameters, its padding modules and
    its ``num_prefix_tokens``."""
    modules = dict(model.named_modules())
    return ModelFacts(
        _feature_info(model),
        {name: layer_widths(module) for name, module in modules.items()},
        {name: sum(p.numel() for p in module.parameters(recurse=False)) for name, module in modules.items()},
        frozenset(name for name, module in modules.items() if _is_padding(module)),
        getattr(model, "num_prefix_tokens", None),
    )


def _feature_info(model: nn.Module) -> FeatureInfo:
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and all(isinstance(e, dict) and "module" in e for e in info):
        entries = list(info)
    else:
        get_dicts = getattr(info, "get_dicts", None)
        entries = list(get_dicts()) if callable(get_dicts) else []
    names = [e["module"] for e in entries]
    once = [e for e in entries if names.count(e["module"]) == 1]
    fmt = getattr(model, "output_fmt", None)
    return FeatureInfo(
        tuple((e["module"], e.get("reduction")) for e in entries),
        {e["module"]: int(e["num_chs"]) for e in once if "num_chs" in e},
        {e["module"]: e["reduction"] for e in once if e.get("reduction")},
        fmt if isinstance(fmt, str) else None,
    )


def layer_widths(module: nn.Module) -> tuple[int, ...]:
    """Channel widths a module's own layers produce: linear and convolution outputs, norm widths."""
    widths = set()
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            widths.add(layer.out_features)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            widths.add(layer.out_channels)
        elif isinstance(layer, nn.LayerNorm):
            widths.add(layer.normalized_shape[-1])
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            widths.add(layer.num_features)
        elif isinstance(layer, nn.GroupNorm):
            widths.add(layer.num_channels)
    return tuple(sorted(widths))


def _is_padding(module: nn.Module) -> bool:
    """Padding changes a map's size, not its resolution."""
    return type(module).__module__ == nn.ZeroPad2d.__module__


def main_logits(output: object) -> torch.Tensor | None:
    """The main logits of a model's output: the tensor itself, a ``.logits`` field (Hugging
    Face, torchvision GoogLeNet and Inception in training) or ``"logits"`` key, the first field
    of a Hugging Face output without one where it is ``(N, K)``, or the first tensor of a tuple
    or list."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        # A Hugging Face ModelOutput that names its logits otherwise
        first = next(iter(output.values()), None)
        is_logits = isinstance(first, torch.Tensor) and first.dim() == 2
        return first if is_logits and hasattr(output, "to_tuple") else None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


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
    logits = main_logits(output)
    if isinstance(logits, torch.Tensor):
        got = tuple(logits.shape)
        what = f"{name} returned {got}" if logits is output else f"{name}'s logits are {got}"
        if _global_pool_off(model):
            return f"{what} in eval mode, not (N, num_classes) logits: {_POOL_ADVICE}"
        if logits.dim() >= 3:
            return (
                f"{what} in eval mode, a feature map or token sequence, not (N, num_classes) logits: "
                "it has no pooled classification head. For timm, create the model with num_classes > 0 "
                "(a model with no classification head, such as a vision encoder, needs one added), or "
                "wrap it so it takes images and returns logits"
            )
        return (
            f"{what} in eval mode, not (N, num_classes) logits. The distiller needs a classifier: for "
            "timm, create the model with num_classes > 0 (a model with no classification head, such "
            "as a vision encoder, needs one added)"
        )
    keys = f" among its keys {list(output)}" if isinstance(output, Mapping) else ""
    return (
        f"{name} returned a {type(output).__name__} with no (N, num_classes) logits tensor{keys} in "
        "eval mode (a 'logits' key or .logits field, the tensor itself or a tuple's first element). "
        "Wrap it so it takes images and returns logits, e.g. a module whose forward is "
        "`return model(images)[key]`"
    )


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


def _signature(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _failure_advice(model: nn.Module, example: torch.Tensor) -> str:
    """What to change when the model fails on the example: its inputs, or the example."""
    parameters = _signature(model)
    inputs = [p.name for p in parameters]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    if _global_pool_off(model):
        return f"It fails because {_POOL_ADVICE}"
    if inputs[:1] == ["input_ids"]:
        if "pixel_values" in inputs:
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
