"""The routing model: :class:`EarlyExitModel` puts a forward hook on every tapped stage that runs
that stage's head; the samples confident enough leave there, and the hook returns the stage
output without them, so the rest of the backbone runs on a smaller batch. When no sample is
left, the hook raises :class:`~.routing.Stop`, which ends the model's forward early (caught in
``_run``): later stages never run.

Calibration, profiling and persistence are in their own modules; the methods here that expose
them only document and delegate.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._policy import ExitCosts
from .._exit_thresholds import checked_thresholds, is_enabled
from .._layout import LAYOUTS
from .._outputs import StageInfo, StageViews
from .._probing import main_logits
from .._taps import Hooks, to_feature_map
from . import _calibration as calibration
from . import _costs as costs
from . import _deployment as deployment
from . import _persistence as persistence
from . import _profiling as profiling
from ._data import Data
from ._probe import check_exits, example_of_shape, probe_batch
from ._routing import ExitOutput, Pass, Stop, drop_samples, nobody

__all__ = ["EarlyExitModel"]


class EarlyExitModel(StageViews, nn.Module):
    """A trained model with its auxiliary heads as real, per-sample early exits (inference only).

    Usually built with :meth:`from_distiller`. Works for every model the distiller trains whose
    later stages read only the tapped stage's output, in every stage layout; a model where a
    later stage also reads an earlier tensor is refused at construction with a ``ValueError``
    naming the stage (docs/early-exit.md says how the probe decides). ``exits.model(x)`` stays
    the plain model; training mode raises. :meth:`export_onnx` writes the exits for ONNX
    Runtime (:mod:`gradual_sd.runtime`).

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
        self._pass: Pass | None = None
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

    # -- routing -----------------------------------------------------------------------------

    def set_thresholds(self, thresholds: Sequence[float] | float) -> None:
        """One threshold per auxiliary head (a single number applies to all): a sample leaves at
        a head when its top softmax probability is ``>=`` the threshold. 0 takes every sample;
        ``math.inf`` disables the head, which then is not run at all. Any other value (95 where
        0.95 is meant) is refused with a ``ValueError`` naming it."""
        self.thresholds = checked_thresholds(thresholds, self.stage_names)

    def _at_stage(self, k: int, name: str, output: object) -> object:
        run = self._pass
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

    def _run(self, images: torch.Tensor, run: Pass) -> torch.Tensor | None:
        """The model's forward with ``run`` in charge of the hooks; ``None`` if every sample
        left before the end."""
        if not self._hooks.active:
            raise RuntimeError("this EarlyExitModel's hooks were removed (remove()); build it again")
        if self.training:
            raise RuntimeError(
                "EarlyExitModel is for inference: call .eval() first (in training mode batch "
                "norm would mix the samples of a batch that shrinks at every exit)"
            )
        self._pass = run
        try:
            logits = main_logits(self.model(images))
        except Stop:
            return None
        finally:
            self._pass = None
        if not isinstance(logits, torch.Tensor) or logits.shape[:1] != run.remaining.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise RuntimeError(
                f"the model returned {got} for the {run.remaining.numel()} samples still running; "
                "expected (N, num_classes) logits"
            )
        return logits

    def _by_threshold(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits.float(), dim=-1).amax(-1) >= self.thresholds[k]

    def forward(self, images: torch.Tensor) -> ExitOutput:
        """Classify ``images``, each sample at the first head confident enough."""
        active = [is_enabled(t) for t in self.thresholds]
        run = Pass(images.shape[0], images.device, active, self._by_threshold)
        return run.result(self._run(images, run), images.shape[0], len(self.heads))

    def exit_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit for every sample (all heads, then the classifier), from one full
        forward pass: what :meth:`calibrate` and :meth:`profile` work from."""
        record: dict[int, torch.Tensor] = {}
        run = Pass(images.shape[0], images.device, [True] * len(self.heads), nobody, record=record)
        logits = self._run(images, run)
        return [record[k] for k in range(len(self.heads))] + [logits]

    def _forced(self, images: torch.Tensor, exit: int) -> ExitOutput:
        """Every sample answers at ``exit``; the enabled heads before it still run (as they would
        for a sample that exits there), for timing an exit."""
        active = [is_enabled(t) or k == exit for k, t in enumerate(self.thresholds)]
        everyone = lambda k, z: torch.full((z.shape[0],), k == exit, device=z.device)  # noqa: E731
        run = Pass(images.shape[0], images.device, active, everyone)
        return run.result(self._run(images, run), images.shape[0], len(self.heads))

    # -- calibration and reporting (calibration.py, costs.py, profiling.py) ------------------

    def exit_costs(self, example: torch.Tensor) -> ExitCosts:
        """FLOPs per sample of the backbone up to each stage, of each head and of the whole model,
        counted with ``torch.utils.flop_counter`` on ``example`` (one sample). That counter counts
        matrix multiplications and convolutions, not element-wise operations."""
        return costs.exit_costs(self, example)

    def calibrate(
        self,
        data: Data,
        max_accuracy_drop: float | None = None,
        *,
        max_cost: float | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Choose the thresholds on held-out ``data`` (an ``(images, targets)`` pair or an
        iterable of such batches), for one of two targets:

        - ``max_accuracy_drop`` (default 0.005 when neither is given): the lowest expected FLOPs
          whose accuracy stays within that fraction of the model's own classifier;
        - ``max_cost``: the best accuracy at or under that mean cost, as a fraction of the
          model's FLOPs (0.5: half), as a deployment budget is stated.

        Every exit's logits come from one full pass over ``data``; the searches are
        :func:`~gradual_sd.early_exit.choose_thresholds` and
        :func:`~gradual_sd.early_exit.choose_thresholds_within_cost`. Sets and returns the
        thresholds with the accuracy, its drop and the relative FLOPs they reach on ``data``. On
        new data the result can be worse: on a few hundred images the thresholds fit the set's
        noise (docs/early-exit.md), so calibrate on as many held-out images as there are.
        Targets must be class indices of the classifier's classes.

        ``progress``: a bar over the batches of ``data`` (tqdm, when installed) on stderr;
        the default shows it only when stderr is a terminal, ``False`` never.
        """
        return calibration.calibrate(self, data, max_accuracy_drop, max_cost, progress)

    def tradeoff(
        self,
        data: Data,
        levels: Sequence[float] = tuple(i / 20 for i in range(21)),
        *,
        progress: bool | None = None,
    ) -> list[dict[str, float]]:
        """The accuracy-compute curve on ``data``: for each level, every head at that threshold
        (simulated from one full pass), the accuracy and the mean FLOPs relative to the model's.
        Thresholds are not changed. :meth:`profile` returns the same curve. ``progress`` as in
        :meth:`calibrate`."""
        calibration.check_levels(levels)
        return calibration.curve(calibration.outcomes(self, data, progress, "tradeoff"), levels)

    def profile(
        self,
        data: Data,
        *,
        batch_sizes: Sequence[int] = (1, 64),
        repeats: int = 5,
        latency_images: int = 64,
        levels: Sequence[float] = tuple(i / 20 for i in range(21)),
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Per exit, at the current thresholds: share of samples, their accuracy and expected
        calibration error, the head's accuracy on every sample, FLOPs per sample to reach it,
        and measured latency; overall: accuracy against the full model's, mean FLOPs and
        latency as ratios to the plain model.

        Latency is timed on the first ``latency_images`` images at each batch size (batch 1:
        one image at a time; a larger batch: as many whole batches as fit, at least one, since
        the exits' saving depends on which images a batch holds), the plain model and every
        variant in turn within each repetition;
        the ratios are medians over ``repeats`` repetitions of per-repetition ratios. On a CPU
        with one torch thread the clock is the process's CPU time, else wall time. Per exit,
        every sample is forced to leave there (the enabled heads before it still run).
        ``tradeoff`` is :meth:`tradeoff`'s curve at ``levels``, from the same pass over ``data``.
        ``progress``: bars over the pass over ``data`` and over the repetitions at each batch
        size, as in :meth:`calibrate`.
        """
        return profiling.profile(self, data, batch_sizes, repeats, latency_images, levels, progress)

    # -- deployment (deployment.py, split.py) ------------------------------------------------

    def export_onnx(
        self,
        directory: str | Path,
        *,
        example_input: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write the exits for ONNX Runtime into ``directory``; returns it.

        The model's exported graph is cut after each tapped stage (``torch.export`` keeps the
        stages' call signatures, so no stage list is written by hand): ``segment_k.onnx`` takes
        the previous segment's outputs (the images for the first) and returns stage ``k``'s,
        the last returns the logits; ``head_k.onnx`` takes stage ``k``'s tapped output and
        returns that head's logits. Every file has a dynamic batch axis. ``manifest.json``
        holds the thresholds, the class names (``class_names``, else the model's own
        ``id2label``/``label_names`` if it has them), the input's shape and dtype (float32),
        the stages with their layouts, the FLOPs of each part, the library version, the
        sha256 of every file and ``metadata`` (anything JSON can hold that a deployment needs,
        such as the input normalisation). :class:`gradual_sd.runtime.OnnxExitModel` runs the folder with
        numpy and onnxruntime alone.

        The folder takes inputs of ``example_input``'s size only (the batch is the only dynamic
        axis); the default is random inputs of :attr:`input_shape`, the size this model was
        built or last calibrated on (else the model's configured size).

        The cut is refused (``ValueError`` naming the stage and what crosses it) where a later
        part of the model reads a tensor from before a stage, and where ``torch.export`` cannot
        trace the model with a dynamic batch. The segments are checked against this model on
        that example before any file is written. Needs ``onnx`` and ``onnxscript`` (the
        ``deploy`` extra).
        """
        return deployment.export_onnx(self, directory, example_input, class_names, metadata)

    # -- saving and loading (persistence.py) --------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.set_thresholds(state["thresholds"])

    def config(self) -> dict[str, Any]:
        """What :meth:`load` needs besides the weights: stages, layouts, thresholds and, for the
        library's heads, how to rebuild them."""
        return persistence.config(self)

    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (the plain model's state_dict), ``heads.pt`` (the heads') and
        ``early_exit.json`` (:meth:`config`, with :attr:`input_shape`) into ``directory``."""
        return persistence.save(self, directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        model: nn.Module,
        heads: Sequence[nn.Module] | None = None,
        *,
        example_input: torch.Tensor | None = None,
        check: bool = True,
    ) -> EarlyExitModel:
        """Rebuild a saved early-exit model without the training code.

        ``model`` is built by the user's own constructor, exactly as trained (same architecture,
        same inserted modules, e.g. ACAM before the pooling); its weights are loaded here.
        ``heads`` are rebuilt from the saved config when they are the library's
        :class:`BottleneckHead` (any ``pool_size``) or :class:`PooledHead`, with ACAM,
        NormalizedACAM or no attention at default settings; other heads must be passed, built as
        in training. The default ``example_input`` is of the saved :attr:`input_shape`.
        """
        return persistence.load(cls, directory, model, heads, example_input, check)

    def remove(self) -> None:
        """Detach the hooks from the model; safe to call more than once. The model stays usable,
        this wrapper does not."""
        self._hooks.remove()

    def extra_repr(self) -> str:
        return f"stage_names={list(self.stage_names)}, thresholds={list(self.thresholds)}"
