"""The routing model: :class:`EarlyExitModel` puts a forward hook on every tapped stage that runs
that stage's head; the samples confident enough leave there, and the hook returns the stage
output without them, so the rest of the backbone runs on a smaller batch. When no sample is
left, the hook raises ``_routing.Stop``, which ends the model's forward early (caught in
:meth:`~EarlyExitModel.run`): later stages never run.

Calibration and reports (``_calibration``), the ONNX export (``_deployment``) and saving and
loading (``_persistence``) are mixins in their own modules, where their methods are documented;
they reach the model through its public methods only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .._exit_thresholds import checked_thresholds, is_enabled
from .._layout import LAYOUTS
from .._records import StageInfo, StageViews
from .._probing import main_logits
from .._taps import Hooks, to_feature_map
from ._calibration import CalibrationMixin
from ._deployment import ExportMixin
from ._persistence import SaveLoadMixin
from ._probe import check_exits, example_of_shape, probe_batch
from ._routing import ExitOutput, Route, Stop, drop_samples, nobody


class EarlyExitModel(CalibrationMixin, ExportMixin, SaveLoadMixin, StageViews, nn.Module):
    """A trained model with its auxiliary heads as real, per-sample early exits (inference only).

    Usually built with :meth:`from_distiller`. Works for every model the distiller trains whose
    later stages read only the tapped stage's output, in every stage layout; a model where a
    later stage also reads an earlier tensor is refused at construction with a ``ValueError``
    naming the stage (docs/early-exit.md says how the probe decides). ``exits.model(x)`` stays
    the plain model; training mode raises. Besides routing, it calibrates and reports
    (:meth:`calibrate`, :meth:`tradeoff`, :meth:`profile`, :meth:`exit_costs`), exports for ONNX
    Runtime (:meth:`export_onnx`, run by :mod:`gradual_sd.runtime`) and saves and loads
    (:meth:`save`, :meth:`load`, :meth:`config`).

    Args:
        model: The trained classifier (the distiller's ``model``).
        heads: One head per stage, ``head(x_nchw) -> (logits, feature)``.
        stages: The tapped stages, shallow to deep, as the distiller describes them
            (``distiller.stages``: name, layout, prefix tokens, tapped tuple element).
        classifier_name: The model's own classifier (named in reports and saved configs).
        thresholds: One per head (see :meth:`set_thresholds`); default all disabled.
        example_input: A batch for the probe (one with fewer than 3 samples is replaced by 4
            random inputs of its shape); default 4 random inputs of the distiller's default
            example (the model's configured input size).
        check: Run the probe (and refuse models that fail it).

    Attributes:
        input_shape: One input's shape without the batch axis, ``(C, H, W)`` for images: the
            example's (the distiller's, with :meth:`from_distiller`), then that of the images
            :meth:`calibrate` last chose the thresholds on; ``None`` where neither was given and
            ``check=False``. :meth:`export_onnx` exports at this size, and :meth:`save` records it.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Sequence[nn.Module],
        stages: Sequence[StageInfo],
        classifier_name: str,
        *,
        thresholds: Sequence[float] | None = None,
        example_input: torch.Tensor | None = None,
        check: bool = True,
    ) -> None:
        super().__init__()
        stages = tuple(stages)
        if not stages:
            raise ValueError("stages is empty; early exit needs at least one auxiliary head")
        if not all(isinstance(stage, StageInfo) for stage in stages):
            raise TypeError(
                "stages must be StageInfo descriptions (distiller.stages, or "
                "gradual_sd.describe_stages(model, names).stages), got "
                f"{[type(stage).__name__ for stage in stages]}"
            )
        if len(heads) != len(stages):
            names = [stage.name for stage in stages]
            raise ValueError(f"need one head per stage: {len(stages)} stages {names}, {len(heads)} heads")
        bad = [stage.layout for stage in stages if stage.layout not in LAYOUTS]
        if bad:
            raise ValueError(f"layouts {bad} are not among {LAYOUTS}")
        self.model = model
        self.heads = nn.ModuleList(heads)
        self.stages: tuple[StageInfo, ...] = stages
        self.classifier_name = classifier_name
        self.thresholds: tuple[float, ...] = (math.inf,) * len(stages)
        self.set_thresholds(thresholds if thresholds is not None else self.thresholds)
        given = example_input is not None
        self.input_shape: tuple[int, ...] | None = tuple(example_input.shape[1:]) if given else None
        self._route: Route | None = None
        self._hooks = Hooks(model)
        for k, stage in enumerate(stages):
            self._hooks.on_output(stage.name, partial(self._at_stage, k))
        self.eval()
        if check:
            try:
                batch = probe_batch(model, example_input)
                self.input_shape = tuple(batch.shape[1:])
                check_exits(self, batch)
            except BaseException:
                self.remove()
                raise

    @classmethod
    def from_distiller(
        cls,
        distiller: nn.Module,
        thresholds: Sequence[float] | None = None,
        *,
        example_input: torch.Tensor | None = None,
        check: bool = True,
    ) -> EarlyExitModel:
        """Take a trained :class:`~gradual_sd.GradualSelfDistiller`'s model, heads and stage
        descriptions; the distiller's hooks are removed (it cannot train any more). The default
        ``example_input`` is of the distiller's example's shape (the size it was built on)."""
        distiller.remove()
        if example_input is None:
            example_input = example_of_shape(distiller.model, distiller._example_shape[1:])
        return cls(
            distiller.model,
            list(distiller.heads),
            distiller.stages,
            distiller.classifier_name,
            thresholds=thresholds,
            example_input=example_input,
            check=check,
        )

    def set_thresholds(self, thresholds: Sequence[float] | float) -> None:
        """One threshold per auxiliary head (a single number applies to all): a sample leaves at
        a head when its top softmax probability is ``>=`` the threshold. 0 takes every sample;
        ``math.inf`` disables the head, which then is not run at all. Any other value (95 where
        0.95 is meant) is refused with a ``ValueError`` naming it."""
        self.thresholds = checked_thresholds(thresholds, self.stage_names)

    def _at_stage(self, k: int, name: str, output: object) -> object:
        run = self._route
        if run is None:
            return None
        stage = self.stages[k]
        tapped = output if stage.element is None else output[stage.element]  # type: ignore[index]
        if not isinstance(tapped, torch.Tensor):
            raise ValueError(
                f"stage {stage.name!r} returns {type(output).__name__}; early exit needs a tensor with "
                "the batch first, to drop the samples that leave"
            )
        if tapped.shape[0] != run.remaining.numel():
            raise RuntimeError(
                f"stage {stage.name!r} got a batch of {tapped.shape[0]} samples but "
                f"{run.remaining.numel()} are still running: the model mixes tensors from before "
                "an earlier exit, so samples cannot leave there"
            )
        run.fired.append(k)
        if k == run.stop_at:
            raise Stop
        if not run.active[k]:
            return None
        logits, _ = self.heads[k](to_feature_map(tapped, stage.layout, stage.num_prefix_tokens))
        if run.record is not None:
            run.record[k] = logits
        leave = run.leave(k, logits)
        if not bool(leave.any()):
            return None
        keep = ~leave
        run.left.append((k, run.remaining[leave], logits[leave]))
        batch = run.remaining.numel()
        run.remaining = run.remaining[keep]
        if run.remaining.numel() == 0:
            raise Stop
        return drop_samples(output, keep, batch)

    def run(self, images: torch.Tensor, route: Route) -> torch.Tensor | None:
        """The model's forward with ``route`` (:class:`~gradual_sd.early_exit.Route`) deciding at
        each tapped stage which samples leave; returns the logits of the samples still running
        at the end, ``None`` where none is. ``route`` records who left where; its ``result``
        puts every exit's logits back in the input order. :meth:`forward` and
        :meth:`exit_logits` are two routes."""
        if not self._hooks.active:
            raise RuntimeError("this EarlyExitModel's hooks were removed (remove()); build it again")
        if self.training:
            raise RuntimeError(
                "EarlyExitModel is for inference: call .eval() first (in training mode batch "
                "norm would mix the samples of a batch that shrinks at every exit)"
            )
        self._route = route
        try:
            logits = main_logits(self.model(images))
        except Stop:
            return None
        finally:
            self._route = None
        if not isinstance(logits, torch.Tensor) or logits.shape[:1] != route.remaining.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise RuntimeError(
                f"the model returned {got} for the {route.remaining.numel()} samples still running; "
                "expected (N, num_classes) logits"
            )
        return logits

    def _by_threshold(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits.float(), dim=-1).amax(-1) >= self.thresholds[k]

    def forward(self, images: torch.Tensor) -> ExitOutput:
        """Classify ``images``, each sample at the first head confident enough."""
        active = [is_enabled(t) for t in self.thresholds]
        route = Route(images.shape[0], images.device, active, self._by_threshold)
        return route.result(self.run(images, route))

    def exit_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit for every sample (all heads, then the classifier), from one full
        forward pass: what :meth:`calibrate` and :meth:`profile` work from."""
        record: dict[int, torch.Tensor] = {}
        route = Route(images.shape[0], images.device, [True] * len(self.heads), nobody, record=record)
        logits = self.run(images, route)
        return [record[k] for k in range(len(self.heads))] + [logits]

    def remove(self) -> None:
        """Detach the hooks from the model; safe to call more than once. The model stays usable,
        this wrapper does not."""
        self._hooks.remove()

    def extra_repr(self) -> str:
        return f"stage_names={list(self.stage_names)}, thresholds={list(self.thresholds)}"
