"""Dry runs that show what a model's modules output, and the checks on what a model must be (a
plain module that takes images and returns logits).

A dry run runs the model once in eval mode without gradients, with hooks on every module that
record the shapes of what it returns. :class:`DryRuns` runs each of the two that construction
may need at most once: the first at the example input, the second at an input ``SCALE`` times
larger with one more image (or, for a model that takes one size, one more image only), which
shows which axes are spatial (they grow), which tokens are prefix tokens (they do not) and
which axis is the batch.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ._lookup import module_names
from ._inputs import default_example_input, input_positions, is_token_ids
from ._taps import Hooks
from ._tuning import SCALE

__all__ = ["DryRuns", "Output", "Probe", "Shape", "checked_model", "main_logits", "run_probe"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Output:
    """What a module returned in a dry run, by shape.

    Attributes:
        kind: ``"tensor"``, or the type's name (``"tuple"``, ``"list"``, ``"dict"``...).
        shapes: A tensor's shape alone; for a tuple or list, each element's shape (``None`` for an
            element that is not a tensor); empty for anything else.
    """

    kind: str
    shapes: tuple[Shape | None, ...] = ()

    @classmethod
    def of(cls, value: object) -> Output:
        if isinstance(value, torch.Tensor):
            return cls("tensor", (tuple(value.shape),))
        if isinstance(value, (tuple, list)):
            shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value)
            return cls(type(value).__name__, shapes)
        return cls(type(value).__name__)

    @property
    def tensor(self) -> Shape | None:
        """The shape of a tensor output; ``None`` for anything else."""
        return self.shapes[0] if self.kind == "tensor" else None

    def __str__(self) -> str:
        if self.kind == "tensor":
            return f"a tensor of shape {self.shapes[0]}"
        if self.kind in ("tuple", "list"):
            parts = ", ".join(str(s) if s is not None else "a non-tensor" for s in self.shapes)
            return f"a {self.kind} of [{parts}]"
        return f"a {self.kind}"


@dataclass
class Probe:
    """What one dry run saw.

    Attributes:
        outputs: Every module that ran, in the order it first finished (what its last call
            returned).
        inputs: The first input of each watched module (the classifier candidates).
        starts: For each watched module, how many outputs had finished when it first started.
        calls: How often each module ran.
        returned: What the model returned.
        watched_outputs: The output tensor of each watched module.
        example: The shape of the input.
        positions: The input's sizes along the axes that grow with it (``(H, W)`` or ``(L,)``).
        scaled: Whether the input was ``SCALE`` times larger than the example (second run).
    """

    outputs: dict[str, Output]
    inputs: dict[str, Output]
    starts: dict[str, int]
    calls: Counter[str]
    returned: object
    watched_outputs: dict[str, torch.Tensor]
    example: Shape
    positions: Shape
    scaled: bool = False

    @cached_property
    def order(self) -> list[str]:
        return list(self.outputs)

    @property
    def batch(self) -> int:
        return self.example[0]

    def logits(self, model: nn.Module) -> torch.Tensor:
        """The returned ``(N, num_classes)`` logits, or a ``ValueError`` that says what to change."""
        logits = main_logits(self.returned)
        if logits is None or logits.dim() != 2:
            raise ValueError(_not_logits(model, self.returned))
        return logits


def run_probe(
    model: nn.Module, example: torch.Tensor, watched: Sequence[str] = (), *, scaled: bool = False
) -> Probe:
    """One eval-mode dry run with hooks on every module (their outputs' shapes) and on
    ``watched`` (their first input's shape and their output tensor). The train/eval state is
    restored; a failure inside the model becomes a ``ValueError`` that says what to change."""
    outputs: dict[str, Output] = {}
    inputs: dict[str, Output] = {}
    starts: dict[str, int] = {}
    calls: Counter[str] = Counter()
    watched_outputs: dict[str, torch.Tensor] = {}

    def finished(name: str, value: object) -> None:
        calls[name] += 1
        outputs[name] = Output.of(value)  # the last call's; the place is the first's
        if name in watched and isinstance(value, torch.Tensor):
            watched_outputs[name] = value

    def started(name: str, value: object) -> None:
        inputs[name] = Output.of(value)
        starts.setdefault(name, len(outputs))

    was_training = model.training
    try:
        with Hooks(model) as hooks, torch.no_grad():
            for name in module_names(model):
                hooks.on_output(name, finished)
            for name in watched:
                hooks.on_input(name, started)
            model.eval()
            returned = model(example)
    except Exception as error:  # the model's own failure, whatever its type
        raise ValueError(
            f"{type(model).__name__} failed on the example input of shape {tuple(example.shape)}: "
            f"{type(error).__name__}: {error}. {_failure_advice(model, example)}"
        ) from error
    finally:
        model.train(was_training)
    shape, positions = tuple(example.shape), input_positions(example)
    return Probe(outputs, inputs, starts, calls, returned, watched_outputs, shape, positions, scaled)


class DryRuns:
    """The dry runs of one construction, each run at most once, when first asked for.

    Args:
        model: The model.
        example: The example input.
        watched: Modules whose inputs and output tensors the first run keeps (the classifier
            candidates).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, watched: Sequence[str] = ()) -> None:
        self.model = model
        self.example = example
        self.watched = tuple(watched)
        self.count = 0  # dry runs started, the failed attempts of the second one included

    @cached_property
    def first(self) -> Probe:
        """The run at the example input."""
        self.count += 1
        return run_probe(self.model, self.example, self.watched)

    @cached_property
    def second(self) -> Probe | None:
        """A run with one more item at an input ``SCALE`` times larger along each spatial axis,
        else at the example's size; ``None`` where neither runs."""
        example = self.example
        batch = example.shape[0] + 1
        positions = input_positions(example)
        channels = example.shape[1 : example.dim() - len(positions)]  # none for token ids
        bigger = (batch, *channels, *(s * SCALE for s in positions))
        for shape, scaled in ((bigger, True), ((batch, *example.shape[1:]), False)):
            self.count += 1
            other = torch.zeros(shape, device=example.device, dtype=example.dtype)
            try:
                return run_probe(self.model, other, scaled=scaled)
            except ValueError:
                continue
        return None


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
