"""GradualSelfDistiller: GSDNet's gradual self distillation around any classification model.

Forward hooks tap the outputs of named stages; one head per stage turns a stage output into
logits and a feature; the model's own classifier is the deepest head, and a forward pre-hook on
it taps the pre-logits vector. The loss is computed from the heads, shallow to deep.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._classifier import pre_logits
from ._finite import FiniteCheck
from ._heads import BottleneckHead, HeadFactory
from ._inputs import checked_example, checked_forward, placement
from ._layout import Layout
from ._losses import INDEX_DTYPES, GradualDistillationLoss, check_targets, target_rule, targets_valid
from ._records import StageInfo, StageViews
from ._probing import checked_model, main_logits
from ._stages import discover
from ._taps import StageTaps, tapped_by, to_feature_map
from ._tuning import DEFAULT_MAX_HEADS


class DistillerOutput(NamedTuple):
    """What :meth:`GradualSelfDistiller.forward` returns.

    Attributes:
        logits: The model's own logits, exactly ``model(images)``.
        loss: The combined scalar loss; ``None`` without targets.
        losses: Weighted loss terms by name (``ce``, ``kl/<stage>``, ``feature/<stage>``...).
        head_logits: Logits of every head, shallow to deep, ending with ``logits``; empty when
            the heads were not run.
        head_features: The matching distillation features; empty when the heads were not run.
        pre_logits: The model's ``(N, D)`` pre-logits, the input of its classifier (pooled for a
            1x1-conv classifier); ``None`` when the heads were not run.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    head_logits: tuple[torch.Tensor, ...]
    head_features: tuple[torch.Tensor, ...]
    pre_logits: torch.Tensor | None = None


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


def _wrappable(model: object) -> nn.Module:
    """``model`` if hooks on its stages can train heads: a plain module (``checked_model``)
    without gradient checkpointing and without another wrapper's hooks."""
    model = checked_model(model)
    if getattr(model, "grad_checkpointing", False):
        raise ValueError(
            "the model has gradient checkpointing enabled; its stages then run outside their "
            "modules' hooks (timm) or without gradients, so the heads cannot be trained. Call "
            "model.set_grad_checkpointing(False) before wrapping"
        )
    already = tapped_by(model)
    if already:
        raise ValueError(
            f"the model already carries another wrapper's hooks on {already}; export() or "
            "remove() that wrapper first (wrapping twice would leave its hooks in the exported model)"
        )
    return model


def deferred_target_check(targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Accelerator targets for one step, checked without a sync: the targets (class indices
    clamped into range, as an index out of range would end in a device-side assert) and the
    0-dim flag that they were valid, for the deferred finiteness check to read."""
    valid = targets_valid(targets, num_classes)
    if targets.dtype in INDEX_DTYPES:
        targets = targets.clamp(0, num_classes - 1)
    return targets, [valid]


def step_labels(
    losses: dict[str, torch.Tensor], head_names: Sequence[str], target_rule: str | None
) -> Callable[[], list[str]]:
    """Names of a step's checked values, in the order the distiller submits them: the loss, its
    terms, every head's logits and features, and the targets' rule where they were checked."""
    terms = tuple(losses)
    return lambda: [
        "loss",
        *(f"term {k}" for k in terms),
        *(f"logits of {n}" for n in head_names),
        *(f"features of {n}" for n in head_names),
        *([target_rule] if target_rule is not None else []),
    ]


class GradualSelfDistiller(StageViews, nn.Module):
    """Wrap a classifier to train it with gradual self distillation (GSDNet).

    Each argument's full rules are in docs/api.md.

    Args:
        model: Any ``nn.Module`` that maps images (or ``(N, C, L)`` sequences) to logits
            through a final linear or 1x1-conv classifier. Not a ``torch.compile``,
            ``DataParallel`` or ``DistributedDataParallel`` wrapper, nor hooked by another
            distiller: wrap the inner model, then compile or parallelise the distiller.
        stage_names: Submodules to tap, shallow to deep, one head each (a string is one
            stage). Default: :func:`~gradual_sd.default_stage_names`, at most ``max_heads``.
        loss: The objective; default :class:`GradualDistillationLoss` with the paper's values.
        head_factory: Builds each stage's head (see :class:`HeadFactory`).
        feature_dim: Width of the distillation features (paper: 128).
        classifier_name: The module holding the final classifier; default timm's
            ``get_classifier()``, else ``fc``/``classifier``/``head``, else the whole model.
        num_classes: If given, checked against the classifier's output.
        stage_layout: ``"NCHW"``/``"NHWC"`` for 4-D stage outputs, ``"NLC"``/``"NCL"`` for
            3-D ones; by default decided from evidence, and checked against it when given.
        num_prefix_tokens: Class/register tokens to drop from token outputs; by default
            counted from the shapes.
        example_input: A batch for the dry runs that describe the stages; default one zero
            image at the model's configured size. A model of ``(N, C, L)`` sequences needs one.
        max_heads: With the default stages, at most this many heads before the model's own
            classifier (the paper: three); ``None`` puts one after every stage found.
        check_finite: Raise ``FloatingPointError`` naming the training step and the
            non-finite loss terms, head logits and features; on CUDA a later step does,
            without stalling the GPU (``finite_check.flush()`` checks the last steps).
        checkpoint_heads: Recompute the heads during backward instead of keeping their
            activations (the peak still holds the largest head's working set).
    """

    teacher_projection_weight: torch.Tensor
    teacher_projection_bias: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        stage_names: str | Sequence[str] | None = None,
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
        max_heads: int | None = DEFAULT_MAX_HEADS,
    ) -> None:
        super().__init__()
        model = _wrappable(model)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        example = checked_example(model, example_input)
        described = discover(
            model,
            example,
            stage_names,
            classifier_name=classifier_name,
            stage_layout=stage_layout,
            num_prefix_tokens=num_prefix_tokens,
            max_heads=max_heads,
        )
        if num_classes is not None and num_classes != described.num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the model's classifier {described.classifier_name!r} "
                f"outputs {described.num_classes} classes"
            )

        self.model = model
        self.loss = loss if loss is not None else GradualDistillationLoss()
        self.stages: tuple[StageInfo, ...] = described.stages
        self.classifier_name = described.classifier_name
        self.num_classes = described.num_classes
        self.hidden_size = described.hidden_size
        self.finite_check: FiniteCheck | None = None
        self.check_finite = check_finite
        self.checkpoint_heads = checkpoint_heads
        self._example_shape = tuple(example.shape)  # what a batch that fails is compared with
        self.heads = nn.ModuleList(
            head_factory(
                in_channels=stage.channels,
                hidden_size=self.hidden_size,
                num_classes=self.num_classes,
                feature_dim=feature_dim,
            )
            for stage in self.stages
        )
        where = placement(model)
        dd: dict[str, Any] = where if "dtype" in where else {}  # a model of float weights
        self.heads.to(**dd)
        # The last classifier's feature only ever serves as a detached teacher, so it would
        # receive no gradient: it is a fixed random projection. (In the authors' code it is a
        # trainable layer that gets gradient only through their in-place sum of the heads'
        # outputs; the examples' as-shipped mode reproduces that.) Buffers, not frozen
        # parameters: DDP must not expect gradients for them.
        projection = nn.Linear(self.hidden_size, feature_dim, **dd)
        self.register_buffer("teacher_projection_weight", projection.weight.detach().clone())
        self.register_buffer("teacher_projection_bias", projection.bias.detach().clone())
        self.taps = StageTaps(model, self.stages, input_names=[self.classifier_name])

    @property
    def head_names(self) -> tuple[str, ...]:
        """Every head in ``head_logits`` order: the stages, then the model's own classifier."""
        return (*self.stage_names, self.classifier_name)

    @property
    def check_finite(self) -> bool:
        """Whether training steps check their values (see the class's ``check_finite``);
        setting it takes effect at the next step, and turning it off checks the pending steps."""
        return self.finite_check is not None

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        if value and self.finite_check is None:
            self.finite_check = FiniteCheck()
        elif not value and self.finite_check is not None:
            self.finite_check.flush()
            self.finite_check = None

    @property
    def attached(self) -> bool:
        """Whether the hooks are still attached to the model."""
        return self.taps.active

    @checked_forward
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
            return self._classify(images, targets)
        logits, stage_outputs, pre_logits = self._capture(images)
        head_logits, head_features = self._run_heads(stage_outputs, logits, pre_logits)
        if targets is None:
            return DistillerOutput(logits, None, {}, head_logits, head_features, pre_logits)
        checking = self.finite_check is not None and not torch.compiler.is_compiling()
        conditions = []
        if checking and targets.device.type != "cpu":
            targets, conditions = deferred_target_check(targets, self.num_classes)
        loss, losses = self.loss(head_logits, head_features, targets, self.head_names)
        if checking:
            labels = step_labels(
                losses, self.head_names, target_rule(targets, self.num_classes) if conditions else None
            )
            self.finite_check.submit(
                [loss, *losses.values(), *head_logits, *head_features], labels, conditions
            )
        return DistillerOutput(logits, loss, losses, head_logits, head_features, pre_logits)

    def _classify(self, images: torch.Tensor, targets: torch.Tensor | None) -> DistillerOutput:
        """The model alone, and the plain cross-entropy with ``targets``."""
        logits = main_logits(self.model(images))
        if targets is None:
            return DistillerOutput(logits, None, {}, (), ())
        if targets.device.type != "cpu":  # the loss checks CPU targets; here one sync is cheap
            check_targets(targets, logits.shape[0], logits.shape[1], check_range=True)
        ce = self.loss.cross_entropy(logits, targets)
        return DistillerOutput(logits, ce, {"ce": ce}, (), ())

    def _capture(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The model's logits, its stage outputs and its pooled pre-logits, from one forward."""
        device = str(images.device)
        captured = self.taps.start(device)
        try:
            logits = main_logits(self.model(images))
        finally:
            self.taps.stop(device)
        if not torch.compiler.is_compiling():
            self._check_captured(captured)
        stage_outputs = [captured[stage.name] for stage in self.stages]
        return logits, stage_outputs, pre_logits(captured[self.classifier_name])

    def _run_heads(
        self, stage_outputs: list[torch.Tensor], logits: torch.Tensor, pre_logits: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Every head's logits and feature, shallow to deep; the model's own classifier last,
        with the fixed projection of its pre-logits as its feature."""
        head_logits, head_features = [], []
        for head, output, stage in zip(self.heads, stage_outputs, self.stages):
            z, f = self._run_head(head, to_feature_map(output, stage.layout, stage.num_prefix_tokens))
            head_logits.append(z)
            head_features.append(f)
        head_logits.append(logits)
        head_features.append(
            F.linear(pre_logits, self.teacher_projection_weight, self.teacher_projection_bias)
        )
        return tuple(head_logits), tuple(head_features)

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
        missing = [n for n in self.head_names if n not in captured]
        if missing:
            raise RuntimeError(
                f"modules {missing} did not run during this forward pass, so their heads cannot "
                "be trained. Gradient checkpointing (timm's set_grad_checkpointing) calls stage "
                "blocks directly and skips these hooks; disable it, or tap modules that run"
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
