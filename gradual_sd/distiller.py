"""GradualSelfDistiller: GSDNet's gradual self distillation around any classification model.

Forward hooks tap the outputs of named stages; one head per stage turns a stage output into
logits and a feature; the model's own classifier is the deepest head, and a forward pre-hook on
it taps the pre-logits vector. The loss is computed from the heads, shallow to deep.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._lookup import find_module, module_names
from .heads import BottleneckHead, HeadFactory
from .losses import GradualDistillationLoss
from .taps import LAYOUTS, Layout, StageTaps, channels_of, infer_layout, probe_outputs, to_feature_map

__all__ = ["GradualSelfDistiller", "DistillerOutput", "default_stage_names"]


class DistillerOutput(NamedTuple):
    """What :meth:`GradualSelfDistiller.forward` returns.

    Attributes:
        logits: The model's own logits, exactly ``model(images)``.
        loss: The combined scalar loss; ``None`` without targets.
        losses: Weighted loss terms by name (``ce``, ``kl/<stage>``, ``feature/<stage>``...).
        head_logits: Logits of every head, shallow to deep, ending with ``logits``; empty when
            the heads were not run.
        head_features: The matching distillation features; empty when the heads were not run.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    head_logits: tuple[torch.Tensor, ...]
    head_features: tuple[torch.Tensor, ...]


def default_stage_names(model: nn.Module) -> list[str]:
    """Stage names from timm's ``feature_info``, without the stem and without the last stage.

    The stem is every entry at reduction < 4 (for example ResNet's ``act1``); the last stage
    feeds the model's own classifier, which is the deepest head.
    """
    info = getattr(model, "feature_info", None)
    if not info or not isinstance(info, (list, tuple)):
        top_level = [n for n in module_names(model) if "." not in n]
        raise ValueError(
            f"{type(model).__name__} has no timm feature_info, so stage_names must be given "
            f"(shallow to deep); its top-level modules are {top_level}"
        )
    names = [entry["module"] for entry in info if entry.get("reduction", 4) >= 4]
    if len(names) < 2:
        raise ValueError(f"feature_info of {type(model).__name__} has fewer than two stages")
    return names[:-1]


def find_classifier_name(model: nn.Module) -> str:
    """Name of the model's final classifier: timm's ``get_classifier()``, else a linear ``fc``,
    ``classifier`` or ``head``, else the last ``nn.Linear``."""
    modules = dict(model.named_modules())
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(
                f"{type(model).__name__}.get_classifier() is {type(classifier).__name__}, not a "
                "linear classifier; create the model with num_classes > 0"
            )
        return next(name for name, module in modules.items() if module is classifier)
    for name in ("fc", "classifier", "head"):
        if isinstance(modules.get(name), nn.Linear):
            return name
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; pass classifier_name")
    return linear[-1]


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A one-image batch at the model's configured input size (timm) or 3x224x224."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else 3
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (in_chans, 224, 224))
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return torch.zeros(1, channels, height, width, device=device, dtype=dtype)


@contextlib.contextmanager
def keep_running_stats(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates made inside the block, so that recomputing a head in backward does
    not count the batch twice in its batch-norm running statistics."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class GradualSelfDistiller(nn.Module):
    """Wrap a classifier to train it with gradual self distillation (GSDNet).

    Args:
        model: Any ``nn.Module`` that maps images to logits through a final linear classifier.
        stage_names: Submodules to tap, shallow to deep, one head each. Default for timm
            models: the ``feature_info`` stages without the stem and the last stage.
        loss: The objective; default :class:`GradualDistillationLoss` with the paper's values.
        head_factory: Builds each stage's head (see :class:`HeadFactory`).
        feature_dim: Width of the distillation features (paper: 128).
        classifier_name: The final classifier's module; found automatically by default.
        num_classes: If given, checked against the classifier's output.
        stage_layout: Layout of 4-D stage outputs, ``"NCHW"`` or ``"NHWC"``; default from timm's
            ``output_fmt`` (Swin: NHWC), else NCHW. 3-D outputs are always ``(N, L, C)`` tokens.
        num_prefix_tokens: Class/register tokens to drop from token outputs; default from the
            model's ``num_prefix_tokens`` (timm ViT), else 0.
        example_input: A batch used once, in eval mode without gradients, to find every stage's
            shape; default one zero image at the model's configured input size.
        check_finite: Raise ``FloatingPointError`` naming the culprits when the loss is not
            finite (one device sync per training step; skipped under ``torch.compile``).
        checkpoint_heads: Recompute the heads during backward instead of saving their
            activations in the forward pass, at the price of a second head forward. This frees
            the heads' activations between forward and backward, but the backward recomputes
            each head while the backbone's activations are still alive, so the peak still holds
            the largest head's working set (docs/benchmarks.md). For a lower peak use a cheaper
            head such as :class:`PooledHead`.
    """

    teacher_projection_weight: torch.Tensor
    teacher_projection_bias: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        stage_names: Sequence[str] | None = None,
        *,
        loss: GradualDistillationLoss | None = None,
        head_factory: HeadFactory = BottleneckHead,
        feature_dim: int = 128,
        classifier_name: str | None = None,
        num_classes: int | None = None,
        stage_layout: Layout | None = None,
        num_prefix_tokens: int | None = None,
        example_input: torch.Tensor | None = None,
        check_finite: bool = True,
        checkpoint_heads: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if getattr(model, "grad_checkpointing", False):
            raise ValueError(
                "the model has gradient checkpointing enabled; its stages then run outside their "
                "modules' hooks (timm) or without gradients, so the heads cannot be trained. Call "
                "model.set_grad_checkpointing(False) before wrapping"
            )
        if stage_layout is not None and stage_layout not in LAYOUTS[:2]:
            raise ValueError(f"stage_layout must be one of {LAYOUTS[:2]} or None, got {stage_layout!r}")
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")

        names = list(default_stage_names(model) if stage_names is None else stage_names)
        classifier_name = classifier_name or find_classifier_name(model)
        self._validate_names(model, names, classifier_name)

        example = default_example_input(model) if example_input is None else example_input
        shapes, order, classes = self._probe(model, names, classifier_name, example)
        if order != names:
            raise ValueError(
                f"stage_names must be listed shallow to deep in the order they run; got {names}, "
                f"but they ran as {order}"
            )
        layout_hint = stage_layout or getattr(model, "output_fmt", None)
        layouts = [infer_layout(shapes[name], name, layout_hint) for name in names]
        if num_classes is not None and num_classes != classes:
            raise ValueError(
                f"num_classes={num_classes} but the model's classifier {classifier_name!r} "
                f"outputs {classes} classes"
            )

        self.model = model
        self.loss = loss if loss is not None else GradualDistillationLoss()
        self.stage_names: tuple[str, ...] = tuple(names)
        self.classifier_name = classifier_name
        self.layouts: tuple[Layout, ...] = tuple(layouts)
        self.num_prefix_tokens = int(
            getattr(model, "num_prefix_tokens", 0) if num_prefix_tokens is None else num_prefix_tokens
        )
        self.num_classes = classes
        self.hidden_size = int(shapes[classifier_name][1])
        self.check_finite = check_finite
        self.checkpoint_heads = checkpoint_heads
        self.heads = nn.ModuleList(
            head_factory(
                in_channels=channels_of(shapes[name], layout),
                hidden_size=self.hidden_size,
                num_classes=self.num_classes,
                feature_dim=feature_dim,
            )
            for name, layout in zip(names, layouts)
        )
        reference = next(model.parameters(), None)
        dd: dict[str, Any] = {}
        if reference is not None and reference.is_floating_point():
            dd = {"device": reference.device, "dtype": reference.dtype}
            self.heads.to(**dd)
        # The last classifier's feature only ever serves as a detached teacher, so it would
        # receive no gradient: it is a fixed random projection. (In the authors' code it is a
        # trainable layer that gets gradient only through their in-place sum of the heads'
        # outputs; the examples' as-shipped mode reproduces that.) Buffers, not frozen
        # parameters: DDP must not expect gradients for them.
        projection = nn.Linear(self.hidden_size, feature_dim, **dd)
        self.register_buffer("teacher_projection_weight", projection.weight.detach().clone())
        self.register_buffer("teacher_projection_bias", projection.bias.detach().clone())
        self.taps = StageTaps(model, names, input_names=[classifier_name])

    @staticmethod
    def _validate_names(model: nn.Module, names: list[str], classifier_name: str) -> None:
        if not names:
            raise ValueError("stage_names is empty; name at least one stage to attach a head to")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"stage_names lists {duplicates} more than once: {names}")
        for name in [*names, classifier_name]:
            find_module(model, name)
        if classifier_name in names:
            raise ValueError(
                f"{classifier_name!r} is the model's classifier (the deepest head); "
                "stage_names lists only the stages before it"
            )

    @staticmethod
    def _probe(
        model: nn.Module, names: list[str], classifier_name: str, example: torch.Tensor
    ) -> tuple[dict[str, torch.Size], list[str], int]:
        """Shapes of every stage output and of the pre-logits, their run order, and the number
        of classes, from one dry run; raises for anything the heads could not use."""
        seen, logits = probe_outputs(model, names, example, input_names=[classifier_name])
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError("the model must return a (N, num_classes) logits tensor")
        missing = [name for name in [*names, classifier_name] if name not in seen]
        if missing:
            raise ValueError(f"modules {missing} did not run in a forward pass of the model")
        shapes: dict[str, torch.Size] = {}
        for name in names:
            value = seen[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"stage {name!r} returns {type(value).__name__}, not a feature-map tensor")
            infer_layout(value.shape, name)
            shapes[name] = value.shape
        pre_logits = seen[classifier_name]
        if not isinstance(pre_logits, torch.Tensor) or pre_logits.dim() != 2:
            got = tuple(pre_logits.shape) if isinstance(pre_logits, torch.Tensor) else pre_logits
            raise ValueError(
                f"classifier {classifier_name!r} must take a (N, D) pre-logits tensor, got {got}"
            )
        shapes[classifier_name] = pre_logits.shape
        order = [name for name in seen if name in names]
        return shapes, order, int(logits.shape[-1])

    @property
    def attached(self) -> bool:
        """Whether the hooks are still attached to the model."""
        return self.taps.active

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        run_heads: bool | None = None,
    ) -> DistillerOutput:
        """Classify ``images``; in training with ``targets``, also run the heads and the loss.

        ``run_heads`` forces the heads on (per-head predictions in eval) or off. Without the
        heads, ``loss`` is the plain cross-entropy when targets are given.
        """
        if not self.taps.active:
            raise RuntimeError(
                "this GradualSelfDistiller's hooks were removed (remove() or export()); wrap the "
                "model again to keep training it"
            )
        if run_heads is None:
            run_heads = self.training and targets is not None
        if not run_heads:
            logits = self.model(images)
            if targets is None:
                return DistillerOutput(logits, None, {}, (), ())
            ce = self.loss.cross_entropy(logits, targets)
            return DistillerOutput(logits, ce, {"ce": ce}, (), ())

        device = str(images.device)
        captured = self.taps.start(device)
        try:
            logits = self.model(images)
        finally:
            self.taps.stop(device)
        if not torch.compiler.is_compiling():
            self._check_captured(captured)
        stage_outputs = [captured[name] for name in self.stage_names]
        pre_logits = captured[self.classifier_name]

        head_logits, head_features = [], []
        for head, output, layout in zip(self.heads, stage_outputs, self.layouts):
            z, f = self._run_head(head, to_feature_map(output, layout, self.num_prefix_tokens))
            head_logits.append(z)
            head_features.append(f)
        head_logits.append(logits)
        head_features.append(
            F.linear(pre_logits, self.teacher_projection_weight, self.teacher_projection_bias)
        )
        if targets is None:
            return DistillerOutput(logits, None, {}, tuple(head_logits), tuple(head_features))
        names = (*self.stage_names, self.classifier_name)
        loss, losses = self.loss(head_logits, head_features, targets, names)
        if self.check_finite and not torch.compiler.is_compiling():
            self._check_finite(loss, losses, names, head_logits, head_features)
        return DistillerOutput(logits, loss, losses, tuple(head_logits), tuple(head_features))

    def _run_head(self, head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.checkpoint_heads and torch.is_grad_enabled()):
            return head(x)
        return checkpoint(
            head,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), keep_running_stats(head)),
        )

    def _check_captured(self, captured: dict[str, torch.Tensor]) -> None:
        missing = [n for n in (*self.stage_names, self.classifier_name) if n not in captured]
        if missing:
            raise RuntimeError(
                f"modules {missing} did not run during this forward pass, so their heads cannot "
                "be trained. Gradient checkpointing (timm's set_grad_checkpointing) calls stage "
                "blocks directly and skips these hooks; disable it, or tap modules that run"
            )

    @staticmethod
    def _check_finite(
        loss: torch.Tensor,
        losses: dict[str, torch.Tensor],
        names: Sequence[str],
        head_logits: list[torch.Tensor],
        head_features: list[torch.Tensor],
    ) -> None:
        if bool(torch.isfinite(loss)):
            return
        bad_terms = [k for k, v in losses.items() if not bool(torch.isfinite(v))]
        bad_logits = [n for n, z in zip(names, head_logits) if not bool(torch.isfinite(z).all())]
        bad_features = [n for n, f in zip(names, head_features) if not bool(torch.isfinite(f).all())]
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}): terms {bad_terms}; non-finite logits from heads "
            f"{bad_logits}; non-finite features from heads {bad_features}"
        )

    def remove(self) -> None:
        """Detach every hook from the model. The wrapper cannot be used afterwards."""
        self.taps.remove()

    def export(self) -> nn.Module:
        """Remove the hooks and return the wrapped model on its own: no heads, no hooks."""
        self.remove()
        return self.model

    def __enter__(self) -> GradualSelfDistiller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"stage_names={list(self.stage_names)}, classifier_name={self.classifier_name!r}"
