"""Early exit: answer each input at the first head that is confident enough, skip the rest.

:class:`EarlyExitModel` keeps a trained model and the auxiliary heads of a
:class:`~gradual_sd.GradualSelfDistiller`. A forward hook on every tapped stage runs that stage's
head; the samples whose top softmax probability reaches the head's threshold leave with the
head's logits, and the hook returns the stage output without them, so the rest of the backbone
runs on a smaller batch. When no sample is left, the hook raises an exception that ends the
model's forward early (caught in :meth:`EarlyExitModel.forward`): later stages never run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from ._lookup import find_module
from .attention import ACAM, NormalizedACAM
from .exit_policy import ExitCosts, choose_thresholds, evaluate, expected_calibration_error, route
from .heads import BottleneckHead, PooledHead
from .layout import LAYOUTS, Layout
from .stages import default_example_input
from .taps import to_feature_map

__all__ = ["EarlyExitModel", "ExitOutput"]

Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]
CONFIG_FILE, MODEL_FILE, HEADS_FILE = "early_exit.json", "model.pt", "heads.pt"
_ATTENTION = {"ACAM": ACAM, "NormalizedACAM": NormalizedACAM, "Identity": None}


class ExitOutput(NamedTuple):
    """What :meth:`EarlyExitModel.forward` returns, in the input order.

    Attributes:
        logits: ``(N, num_classes)`` logits of the exit that answered each sample.
        exit_index: ``(N,)`` long: which exit answered, ``0..len(heads) - 1`` for the auxiliary
            heads (shallow to deep) and ``len(heads)`` for the model's own classifier.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor


class _Outcomes(NamedTuple):
    logits: list[torch.Tensor]  # every exit's, over the data, on the CPU
    targets: torch.Tensor
    confidence: torch.Tensor  # (heads, N): each head's top softmax probability
    correct: torch.Tensor  # (heads + 1, N): whether each exit is right
    costs: ExitCosts


def _curve(outcomes: _Outcomes, levels: Sequence[float]) -> list[dict[str, float]]:
    """Accuracy and relative FLOPs with every head at each threshold level."""
    _, _, confidence, correct, costs = outcomes
    curve = []
    for level in levels:
        accuracy, flops = evaluate(confidence, correct, costs, [level] * confidence.shape[0])
        curve.append({"threshold": level, "accuracy": accuracy, "flops_ratio": flops / costs.full})
    return curve


class _Stop(Exception):
    """Raised inside the model's forward when no sample is left to run the later stages."""


class _Pass:
    """One forward pass through the exits: who is still in, and who left where.

    ``leave(k, head_logits)`` decides which of the remaining samples leave at stage ``k``; it
    is only called for heads in ``active`` (the others are not run). ``stop_at`` ends the
    forward right after that stage, before its head (to measure the backbone's cost alone).
    ``record`` collects every active head's logits.
    """

    def __init__(
        self,
        batch: int,
        device: torch.device,
        active: Sequence[bool],
        leave: Callable[[int, torch.Tensor], torch.Tensor],
        stop_at: int | None = None,
        record: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.remaining = torch.arange(batch, device=device)
        self.active, self.leave, self.stop_at, self.record = active, leave, stop_at, record
        self.fired: list[int] = []
        self.left: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (exit, indices, logits)

    def result(self, logits: torch.Tensor | None, batch: int, final_exit: int) -> ExitOutput:
        """Scatter every exit's logits back to the input order."""
        parts = list(self.left)
        if logits is not None:
            parts.append((final_exit, self.remaining, logits))
        indices = torch.cat([p[1] for p in parts])
        values = torch.cat([p[2] for p in parts])  # promotes, e.g. float16 heads under autocast
        exits = torch.cat([torch.full_like(p[1], p[0]) for p in parts])
        out = values.new_empty((batch, values.shape[1]))
        out[indices] = values
        exit_index = torch.empty_like(exits)
        exit_index[indices] = exits
        return ExitOutput(out, exit_index)


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
        self._pass: _Pass | None = None
        self._handles: list[RemovableHandle] = []
        for k, name in enumerate(names):
            module = find_module(model, name)
            self._handles.append(module.register_forward_hook(partial(self._at_stage, k)))
        self.eval()
        if check:
            try:
                self._check_exits(_probe_batch(model, example_input))
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
            raise _Stop
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
            raise _Stop
        return output[keep]

    def _run(self, images: torch.Tensor, run: _Pass) -> torch.Tensor | None:
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
        except _Stop:
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
        run = _Pass(images.shape[0], images.device, active, self._by_threshold)
        return run.result(self._run(images, run), images.shape[0], len(self.heads))

    def exit_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit for every sample (all heads, then the classifier), from one full
        forward pass: what :meth:`calibrate` and :meth:`profile` work from."""
        record: dict[int, torch.Tensor] = {}
        never = lambda k, z: torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)  # noqa: E731
        run = _Pass(images.shape[0], images.device, [True] * len(self.heads), never, record=record)
        logits = self._run(images, run)
        return [record[k] for k in range(len(self.heads))] + [logits]

    def _forced(self, images: torch.Tensor, exit: int) -> ExitOutput:
        """Every sample answers at ``exit``; the enabled heads before it still run (as they would
        for a sample that exits there), for timing an exit."""
        active = [t <= 1 or k == exit for k, t in enumerate(self.thresholds)]
        everyone = lambda k, z: torch.full((z.shape[0],), k == exit, device=z.device)  # noqa: E731
        run = _Pass(images.shape[0], images.device, active, everyone)
        return run.result(self._run(images, run), images.shape[0], len(self.heads))

    # -- construction check -----------------------------------------------------------------

    def _check_exits(self, batch: torch.Tensor) -> None:
        """Let sample 0 leave at each stage in turn and check the others' logits are unchanged."""
        with torch.no_grad():
            reference = self.model(batch)
            if not isinstance(reference, torch.Tensor) or reference.dim() != 2:
                raise ValueError("the model must return (N, num_classes) logits for early exit")
            run = _Pass(batch.shape[0], batch.device, [False] * len(self.heads), lambda k, z: z)
            self._run(batch, run)
            if run.fired != list(range(len(self.heads))):
                ran = [self.stage_names[k] for k in run.fired]
                raise ValueError(
                    f"each stage must run once, in order {list(self.stage_names)}; they ran as {ran}"
                )
            scale = float(reference.abs().max()) + 1.0
            for k, name in enumerate(self.stage_names):
                first = lambda j, z: torch.arange(z.shape[0], device=z.device) == 0  # noqa: E731
                active = [j == k for j in range(len(self.heads))]
                run = _Pass(batch.shape[0], batch.device, active, first)
                try:
                    logits = self._run(batch, run)
                except (RuntimeError, ValueError) as error:
                    raise ValueError(
                        f"samples cannot leave at stage {name!r}: the rest of the model fails on "
                        f"the smaller batch ({error}). A later stage probably also reads a tensor "
                        "from before this stage (cross-stage links as in HRNet or DenseNet-style "
                        "models); tap only stages after which nothing earlier is read"
                    ) from error
                difference = (logits - reference[1:]).abs().max().item()
                if difference > 1e-4 * scale:
                    raise ValueError(
                        f"samples cannot leave at stage {name!r}: when one sample leaves there, "
                        f"the others' logits change by up to {difference:.3g}. A later stage reads "
                        "more than this stage's output (a cross-stage link, or an operation that "
                        "mixes the batch); tap only stages after which nothing earlier is read"
                    )

    # -- calibration and reporting ----------------------------------------------------------

    def _collect(self, data: Data) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every exit's logits (on the CPU, float32) and the targets, over all of ``data``."""
        per_exit: list[list[torch.Tensor]] = [[] for _ in range(len(self.heads) + 1)]
        targets = []
        with torch.inference_mode():
            for images, labels in _batches(data, self._device()):
                for store, logits in zip(per_exit, self.exit_logits(images)):
                    store.append(logits.float().cpu())
                targets.append(labels.cpu())
        return [torch.cat(z) for z in per_exit], torch.cat(targets)

    def exit_costs(self, example: torch.Tensor) -> ExitCosts:
        """FLOPs per sample of the backbone up to each stage, of each head and of the whole model,
        counted with ``torch.utils.flop_counter`` on ``example`` (one sample). That counter counts
        matrix multiplications and convolutions, not element-wise operations."""
        example = example[:1]
        with torch.inference_mode():
            full = _flops(self.model, example)
            stages, heads = [], []
            everyone = lambda j, z: torch.ones(z.shape[0], dtype=torch.bool, device=z.device)  # noqa: E731
            for k in range(len(self.heads)):
                run = _Pass(1, example.device, [False] * len(self.heads), everyone, stop_at=k)
                stages.append(_flops(self._run, example, run))
                alone = [j == k for j in range(len(self.heads))]
                run = _Pass(1, example.device, alone, everyone)
                heads.append(_flops(self._run, example, run) - stages[-1])
        return ExitCosts(tuple(stages), tuple(heads), full)

    def calibrate(self, data: Data, max_accuracy_drop: float = 0.005) -> dict[str, Any]:
        """Choose the thresholds on held-out ``data`` (an ``(images, targets)`` pair or an
        iterable of such batches): the lowest expected FLOPs whose accuracy on ``data`` stays
        within ``max_accuracy_drop`` (a fraction) of the model's own classifier.

        Every exit's logits come from one full pass over ``data``; the search is
        :func:`~gradual_sd.exit_policy.choose_thresholds` (coordinate descent over the observed
        confidences). Sets and returns the thresholds with the accuracy and relative FLOPs they
        reach on ``data``. On new data the drop can be larger: on a few hundred images the
        thresholds fit the set's noise (docs/early-exit.md), so calibrate on as many held-out
        images as there are.
        """
        _, _, confidence, correct, costs = self._outcomes(data)
        self.set_thresholds(choose_thresholds(confidence, correct, costs, max_accuracy_drop))
        accuracy, flops = evaluate(confidence, correct, costs, self.thresholds)
        return {
            "thresholds": list(self.thresholds),
            "accuracy": accuracy,
            "full_accuracy": correct[-1].double().mean().item(),
            "flops_ratio": flops / costs.full,
        }

    def tradeoff(
        self, data: Data, levels: Sequence[float] = tuple(i / 20 for i in range(21))
    ) -> list[dict[str, float]]:
        """The accuracy-compute curve on ``data``: for each level, every head at that threshold
        (simulated from one full pass), the accuracy and the mean FLOPs relative to the model's.
        Thresholds are not changed. :meth:`profile` returns the same curve."""
        return _curve(self._outcomes(data), levels)

    def _outcomes(self, data: Data) -> _Outcomes:
        """Every exit's logits and the targets over ``data`` (one full pass), and what routing
        is simulated from: each head's confidence, whether each exit is right, the costs."""
        logits, targets = self._collect(data)
        costs = self.exit_costs(_first_image(data, self._device()))
        confidence = torch.stack([F.softmax(z, -1).amax(-1) for z in logits[:-1]])
        correct = torch.stack([z.argmax(-1) == targets for z in logits])
        return _Outcomes(logits, targets, confidence, correct, costs)

    def profile(
        self,
        data: Data,
        *,
        batch_sizes: Sequence[int] = (1, 64),
        repeats: int = 5,
        latency_images: int = 64,
        levels: Sequence[float] = tuple(i / 20 for i in range(21)),
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
        """
        outcomes = self._outcomes(data)
        logits, targets, confidence, _, costs = outcomes
        device = self._device()
        exits = route(confidence, self.thresholds)
        per_exit_flops = costs.per_exit(self.thresholds)
        names = [*self.stage_names, self.classifier_name]
        rows = []
        for k, name in enumerate(names):
            mine = exits == k
            probs = F.softmax(logits[k][mine], -1)
            rows.append(
                {
                    "exit": name,
                    "threshold": self.thresholds[k] if k < len(self.heads) else None,
                    "share": mine.double().mean().item(),
                    "accuracy": (probs.argmax(-1) == targets[mine]).double().mean().item()
                    if mine.any()
                    else math.nan,
                    "ece": expected_calibration_error(probs, targets[mine]),
                    "head_accuracy_all": (logits[k].argmax(-1) == targets).double().mean().item(),
                    "flops": per_exit_flops[k].item(),
                    "flops_ratio": per_exit_flops[k].item() / costs.full,
                }
            )
        chosen = torch.stack(logits)[exits, torch.arange(exits.numel())]
        images = _first_images(data, device, max(latency_images, *batch_sizes))
        latency = {b: self._latency(images, b, repeats, latency_images) for b in batch_sizes}
        for k, row in enumerate(rows):
            row["latency_ratio"] = {b: latency[b][f"exit {k}"] for b in batch_sizes}
        return {
            "exits": rows,
            "accuracy": (chosen.argmax(-1) == targets).double().mean().item(),
            "full_accuracy": (logits[-1].argmax(-1) == targets).double().mean().item(),
            "flops": per_exit_flops[exits].mean().item(),
            "full_flops": costs.full,
            "flops_ratio": per_exit_flops[exits].mean().item() / costs.full,
            "latency_ratio": {b: latency[b]["exits"] for b in batch_sizes},
            "latency_ms_per_image": {b: latency[b]["ms"] for b in batch_sizes},
            "samples": int(targets.numel()),
            "tradeoff": _curve(outcomes, levels),
        }

    def _latency(self, images: torch.Tensor, batch: int, repeats: int, count: int) -> dict[str, Any]:
        """Median ratios to the plain model of the time per image of the exits (and of every
        forced exit), on ``count`` images at batch 1, or on the whole batches of ``batch`` that
        fit in ``count`` images (at least one)."""
        whole = max(batch, count - count % batch)
        chunks = list(images[:whole].split(batch))
        variants: dict[str, Callable[[torch.Tensor], object]] = {"plain": self.model, "exits": self}
        for k in range(len(self.heads) + 1):
            variants[f"exit {k}"] = partial(self._forced, exit=k)
        times: dict[str, list[float]] = {name: [] for name in variants}
        device = images.device
        # With one CPU thread, the process's CPU time is the work done, whatever else the
        # machine runs; otherwise (more threads, CUDA) only wall time measures it.
        one_thread_cpu = device.type == "cpu" and torch.get_num_threads() == 1
        clock = time.process_time if one_thread_cpu else time.perf_counter
        with torch.inference_mode():
            for fn in variants.values():  # warm-up
                fn(chunks[0])
            for rep in range(repeats):
                order = list(variants)[rep % len(variants) :] + list(variants)[: rep % len(variants)]
                for name in order:
                    _synchronize(device)
                    start = clock()
                    for chunk in chunks:
                        variants[name](chunk)
                    _synchronize(device)
                    times[name].append(clock() - start)
        result: dict[str, Any] = {
            name: statistics.median(t / p for t, p in zip(times[name], times["plain"]))
            for name in variants
            if name != "plain"
        }
        images_timed = sum(chunk.shape[0] for chunk in chunks)
        result["ms"] = {
            name: 1000 * statistics.median(times[name]) / images_timed for name in ("plain", "exits")
        }
        return result

    def _device(self) -> torch.device:
        reference = next(self.model.parameters(), None)
        return reference.device if reference is not None else torch.device("cpu")

    # -- saving and loading -----------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.set_thresholds(state["thresholds"])

    def config(self) -> dict[str, Any]:
        """What :meth:`load` needs besides the weights: stages, layouts, thresholds and, for the
        library's heads, how to rebuild them."""
        return {
            "stage_names": list(self.stage_names),
            "layouts": list(self.layouts),
            "classifier_name": self.classifier_name,
            "num_prefix_tokens": list(self.num_prefix_tokens),
            "thresholds": [t if t <= 1 else None for t in self.thresholds],
            "heads": [_head_spec(head) for head in self.heads],
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (the plain model's state_dict), ``heads.pt`` (the heads') and
        ``early_exit.json`` (:meth:`config`) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        torch.save(self.heads.state_dict(), directory / HEADS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n")
        return directory

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
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
        head_list = nn.ModuleList(heads if heads is not None else [_build_head(s) for s in config["heads"]])
        head_list.load_state_dict(torch.load(directory / HEADS_FILE, map_location="cpu", weights_only=True))
        reference = next(model.parameters(), None)
        if reference is not None:
            head_list.to(reference.device)
        thresholds = [math.inf if t is None else t for t in config["thresholds"]]
        return cls(
            model,
            list(head_list),
            config["stage_names"],
            config["layouts"],
            config["classifier_name"],
            config["num_prefix_tokens"],
            thresholds=thresholds,
            example_input=example_input,
            check=check,
        )

    def remove(self) -> None:
        """Detach the hooks from the model; safe to call more than once. The model stays usable,
        this wrapper does not."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"stage_names={list(self.stage_names)}, thresholds={list(self.thresholds)}"


def _head_spec(head: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of the library's heads, or ``None`` for heads it cannot describe."""
    attention = type(getattr(head, "attn", None)).__name__
    if type(head) not in (BottleneckHead, PooledHead) or attention not in _ATTENTION:
        return None
    spec = {
        "class": type(head).__name__,
        "in_channels": head.fc.in_features,
        "hidden_size": head.fc.in_features,
        "num_classes": head.fc.out_features,
        "feature_dim": head.feature.out_features,
        "attn_layer": None if attention == "Identity" else attention,
    }
    if isinstance(head, BottleneckHead):
        if type(head.norm) is not nn.BatchNorm2d:
            return None
        spec["in_channels"] = head.conv.in_channels
        spec["pool_size"] = head.pool_size
    return spec


def _build_head(spec: dict[str, Any] | None) -> nn.Module:
    if spec is None:
        raise ValueError(
            "the saved config does not describe these heads (not the library's heads at default "
            "settings); build them as in training and pass heads=[...] to EarlyExitModel.load"
        )
    spec = dict(spec)
    factory = {"BottleneckHead": BottleneckHead, "PooledHead": PooledHead}[spec.pop("class")]
    attention = spec.pop("attn_layer")
    return factory(**spec, attn_layer=_ATTENTION[attention] if attention else None)


def _flops(fn: Callable[..., object], *args: object) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(
    data: Data, device: torch.device, size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, targets)`` batches on ``device`` from a pair of tensors or an iterable."""
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    if pair and all(isinstance(t, torch.Tensor) for t in data):
        images, targets = data
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        pairs: Iterable = zip(images.split(size), targets.split(size))
    else:
        pairs = data
    for batch in pairs:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("data must be (images, targets) tensors or an iterable of such batches")
        yield batch[0].to(device), batch[1].to(device)


def _first_images(data: Data, device: torch.device, count: int) -> torch.Tensor:
    taken, total = [], 0
    for images, _ in _batches(data, device):
        taken.append(images[: count - total])
        total += taken[-1].shape[0]
        if total >= count:
            break
    if not taken:
        raise ValueError("data is empty")
    return torch.cat(taken)


def _first_image(data: Data, device: torch.device) -> torch.Tensor:
    return _first_images(data, device, 1)


def _probe_batch(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    """A batch of 4 different inputs: the given one if it has at least 3 samples, else random
    images shaped like it (default: as :func:`~gradual_sd.stages.default_example_input`)."""
    if example is not None and example.shape[0] >= 3:
        return example
    if example is None:
        example = default_example_input(model)
    if not example.is_floating_point():
        raise ValueError("pass an example_input with at least 3 samples for a non-float input")
    shape, device, dtype = tuple(example.shape[1:]), example.device, example.dtype
    generator = torch.Generator().manual_seed(0)
    return torch.randn((4, *shape), generator=generator).to(device=device, dtype=dtype)
