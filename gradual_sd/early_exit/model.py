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
from torch.utils.hooks import RemovableHandle

from .._lookup import find_module
from ..exit_policy import ExitCosts
from ..layout import LAYOUTS, Layout
from ..taps import to_feature_map
from . import calibration, costs, persistence, profiling
from .data import Data
from .probe import check_exits, probe_batch
from .routing import ExitOutput, Pass, Stop, nobody

__all__ = ["EarlyExitModel"]


class EarlyExitModel(nn.Module):
    """A trained model with its auxiliary heads as real, per-sample early exits (inference only).

    Usually built with :meth:`from_distiller`. Works for backbones whose later stages read only
    the tapped stage's output (ResNet, ConvNeXt, EfficientNet, ViT, Swin...). At construction a
    probe lets one sample leave at each stage in turn and checks that the others' logits are
    unchanged; a model where a later stage also reads an earlier tensor (HRNet, cross-stage
    links) fails the probe and is refused with a ``ValueError`` naming the stage.

    The hooks do nothing outside :meth:`forward`, so ``exits.model(x)`` stays the plain model.
    Training mode raises: batch norm would then mix the samples of a batch that shrinks.
    ``torch.compile`` cannot follow the data-dependent batch sizes; compile the plain model if
    exits are not wanted.

    Args:
        model: The trained classifier (the distiller's ``model``).
        heads: One head per stage, ``head(x_nchw) -> (logits, feature)``.
        stage_names: Tapped stages, shallow to deep.
        layouts: Layout of each stage output (``"NCHW"``, ``"NHWC"`` or ``"NLC"``).
        classifier_name: The model's own classifier (recorded in saved configs).
        num_prefix_tokens: Class/register tokens that token stages drop before their head: one
            count per stage, or one for all.
        thresholds: One per head (see :meth:`set_thresholds`); default all disabled.
        example_input: A batch for the probe (one with fewer than 3 samples is replaced by 4
            random inputs of its shape); default 4 random images at the model's configured
            input size (timm), else 3x224x224.
        check: Run the probe (and refuse models that fail it).
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Sequence[nn.Module],
        stage_names: Sequence[str],
        layouts: Sequence[Layout],
        classifier_name: str,
        num_prefix_tokens: int | Sequence[int] = 0,
        *,
        thresholds: Sequence[float] | None = None,
        example_input: torch.Tensor | None = None,
        check: bool = True,
    ) -> None:
        super().__init__()
        names = list(stage_names)
        if not names:
            raise ValueError("stage_names is empty; early exit needs at least one auxiliary head")
        if len(heads) != len(names) or len(layouts) != len(names):
            raise ValueError(
                f"need one head and one layout per stage: {len(names)} stages {names}, "
                f"{len(heads)} heads, {len(layouts)} layouts"
            )
        bad = [layout for layout in layouts if layout not in LAYOUTS]
        if bad:
            raise ValueError(f"layouts {bad} are not among {LAYOUTS}")
        self.model = model
        self.heads = nn.ModuleList(heads)
        self.stage_names: tuple[str, ...] = tuple(names)
        self.layouts: tuple[Layout, ...] = tuple(layouts)
        self.classifier_name = classifier_name
        prefix = [num_prefix_tokens] * len(names) if isinstance(num_prefix_tokens, int) else num_prefix_tokens
        self.num_prefix_tokens: tuple[int, ...] = tuple(int(p) for p in prefix)
        if len(self.num_prefix_tokens) != len(names):
            raise ValueError(f"need one num_prefix_tokens per stage, got {num_prefix_tokens!r} for {names}")
        self.thresholds: tuple[float, ...] = (math.inf,) * len(names)
        self.set_thresholds(thresholds if thresholds is not None else self.thresholds)
        self._pass: Pass | None = None
        self._handles: list[RemovableHandle] = []
        for k, name in enumerate(names):
            module = find_module(model, name)
            self._handles.append(module.register_forward_hook(partial(self._at_stage, k)))
        self.eval()
        if check:
            try:
                check_exits(self, probe_batch(model, example_input))
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
        """Take a trained :class:`~gradual_sd.GradualSelfDistiller`'s model and heads; the
        distiller's hooks are removed (it cannot train any more)."""
        distiller.remove()
        return cls(
            distiller.model,
            list(distiller.heads),
            distiller.stage_names,
            distiller.layouts,
            distiller.classifier_name,
            distiller.num_prefix_tokens,
            thresholds=thresholds,
            example_input=example_input,
            check=check,
        )

    # -- routing -----------------------------------------------------------------------------

    def set_thresholds(self, thresholds: Sequence[float] | float) -> None:
        """One threshold per auxiliary head (a single number applies to all): a sample leaves at
        a head when its top softmax probability is ``>=`` the threshold. 0 takes every sample;
        above 1 (e.g. ``math.inf``) disables the head, which then is not run at all."""
        single = isinstance(thresholds, (int, float))
        values = [float(thresholds)] * len(self.heads) if single else list(thresholds)
        if len(values) != len(self.heads):
            raise ValueError(
                f"need {len(self.heads)} thresholds (one per head after {list(self.stage_names)}), "
                f"got {len(values)}: {values}"
            )
        bad = [v for v in values if not isinstance(v, (int, float)) or math.isnan(v) or v < 0]
        if bad:
            raise ValueError(f"thresholds must be numbers >= 0 (above 1 disables a head), got {bad}")
        self.thresholds = tuple(float(v) for v in values)

    def _at_stage(self, k: int, module: nn.Module, args: tuple, output: object) -> torch.Tensor | None:
        run = self._pass
        if run is None:
            return None
        name = self.stage_names[k]
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"stage {name!r} returns {type(output).__name__}; early exit needs a tensor with "
                "the batch first, to drop the samples that leave"
            )
        if output.shape[0] != run.remaining.numel():
            raise RuntimeError(
                f"stage {name!r} got a batch of {output.shape[0]} samples but "
                f"{run.remaining.numel()} are still running: the model mixes tensors from before "
                "an earlier exit, so samples cannot leave there"
            )
        run.fired.append(k)
        if k == run.stop_at:
            raise Stop
        if not run.active[k]:
            return None
        logits, _ = self.heads[k](to_feature_map(output, self.layouts[k], self.num_prefix_tokens[k]))
        if run.record is not None:
            run.record[k] = logits
        leave = run.leave(k, logits)
        if not bool(leave.any()):
            return None
        keep = ~leave
        run.left.append((k, run.remaining[leave], logits[leave]))
        run.remaining = run.remaining[keep]
        if run.remaining.numel() == 0:
            raise Stop
        return output[keep]

    def _run(self, images: torch.Tensor, run: Pass) -> torch.Tensor | None:
        """The model's forward with ``run`` in charge of the hooks; ``None`` if every sample
        left before the end."""
        if not self._handles:
            raise RuntimeError("this EarlyExitModel's hooks were removed (remove()); build it again")
        if self.training:
            raise RuntimeError(
                "EarlyExitModel is for inference: call .eval() first (in training mode batch "
                "norm would mix the samples of a batch that shrinks at every exit)"
            )
        self._pass = run
        try:
            logits = self.model(images)
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
        active = [t <= 1 for t in self.thresholds]
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
        active = [t <= 1 or k == exit for k, t in enumerate(self.thresholds)]
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
        self, data: Data, max_accuracy_drop: float = 0.005, *, progress: bool | None = None
    ) -> dict[str, Any]:
        """Choose the thresholds on held-out ``data`` (an ``(images, targets)`` pair or an
        iterable of such batches): the lowest expected FLOPs whose accuracy on ``data`` stays
        within ``max_accuracy_drop`` (a fraction) of the model's own classifier.

        Every exit's logits come from one full pass over ``data``; the search is
        :func:`~gradual_sd.exit_policy.choose_thresholds` (coordinate descent over the observed
        confidences). Sets and returns the thresholds with the accuracy and relative FLOPs they
        reach on ``data``. On new data the drop can be larger: on a few hundred images the
        thresholds fit the set's noise (docs/early-exit.md), so calibrate on as many held-out
        images as there are.

        ``progress``: a bar over the batches of ``data`` (tqdm, when installed) on stderr;
        the default shows it only when stderr is a terminal, ``False`` never.
        """
        return calibration.calibrate(self, data, max_accuracy_drop, progress)

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
        ``early_exit.json`` (:meth:`config`) into ``directory``."""
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
        in training.
        """
        return persistence.load(cls, directory, model, heads, example_input, check)

    def remove(self) -> None:
        """Detach the hooks from the model; safe to call more than once. The model stays usable,
        this wrapper does not."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"stage_names={list(self.stage_names)}, thresholds={list(self.thresholds)}"
