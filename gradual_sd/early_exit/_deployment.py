"""Write an early-exit model as an exit folder: one ONNX file per backbone segment and per head,
and a manifest, for :class:`gradual_sd.runtime.OnnxExitModel`. :class:`ExportMixin` gives
:class:`~gradual_sd.EarlyExitModel` its ``export_onnx``; the graph is cut in ``_split``."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._exit_thresholds import saved_thresholds
from .._taps import to_feature_map
from ..runtime._manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, sha256
from ._data import device_of
from ._persistence import stage_entry
from ._probe import example_of_shape, probe_batch
from ._routing import difference
from ._split import Segment, batch_dynamic_shapes, run_segments, split_model

if TYPE_CHECKING:
    from ._model import EarlyExitModel


class _HeadGraph(nn.Module):
    """A head as one exportable graph: the stage output in its own layout to the head's logits."""

    def __init__(self, head: nn.Module, layout: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.head, self.layout, self.num_prefix_tokens = head, layout, num_prefix_tokens

    def forward(self, stage_output: torch.Tensor) -> torch.Tensor:
        return self.head(to_feature_map(stage_output, self.layout, self.num_prefix_tokens))[0]


class ExportMixin:
    """:class:`~gradual_sd.EarlyExitModel`'s export for ONNX Runtime."""

    def export_onnx(
        self: EarlyExitModel,
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
        directory = Path(directory)
        metadata_text = json.dumps(metadata or {})  # refuse what JSON cannot hold before any work
        example = _float_batch(self, example_input)
        with torch.no_grad():
            segments = split_model(self.model, self.stages, example[:2])
            _check_against_model(self, segments, example)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)  # a half-written folder has no manifest
        files: dict[str, str] = {}
        stage_entries = []
        carried: tuple[torch.Tensor, ...] = (example[:2],)
        for k, (segment, stage) in enumerate(zip(segments, self.stages)):
            name, head_name = f"segment_{k}.onnx", f"head_{k}.onnx"
            with torch.no_grad():
                produced = segment.module(*carried)
            inputs = _input_names(k, len(carried))
            _write(segment.module, carried, directory / name, inputs, _output_names(produced), files)
            head = _HeadGraph(self.heads[k], stage.layout, stage.num_prefix_tokens).eval()
            head_input = (produced[segment.head_input],)
            _write(head, head_input, directory / head_name, ["stage_output"], ["logits"], files)
            entry = {"segment": name, "head": head_name, "head_input": segment.head_input}
            stage_entries.append({**stage_entry(stage), **entry})
            carried = produced
        final = f"segment_{len(self.stages)}.onnx"
        inputs = _input_names(len(self.stages), len(carried))
        _write(segments[-1].module, carried, directory / final, inputs, ["logits"], files)
        manifest = _manifest(self, example, class_names, stage_entries, final, files)
        manifest["metadata"] = json.loads(metadata_text)
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return directory


def _float_batch(exits: EarlyExitModel, example_input: torch.Tensor | None) -> torch.Tensor:
    """Four different float32 inputs on the model's device (the probe's batch), by default of
    the size the exits were built or calibrated on."""
    if example_input is None:
        example_input = example_of_shape(exits.model, exits.input_shape)
    batch = probe_batch(exits.model, example_input)
    if batch.dtype != torch.float32:
        raise TypeError(
            f"export_onnx takes float32 images (the runtime's input), got example_input of {batch.dtype}"
        )
    return batch.to(device_of(exits.model))


def _check_against_model(exits: EarlyExitModel, segments: list[Segment], images: torch.Tensor) -> None:
    """The segments in a chain must give every exit's logits that the model and its heads give."""
    expected = exits.exit_logits(images)
    head_inputs, logits = run_segments(segments, images)
    got = [
        _HeadGraph(head, stage.layout, stage.num_prefix_tokens)(x)
        for head, stage, x in zip(exits.heads, exits.stages, head_inputs)
    ]
    for name, a, b in zip([*exits.stage_names, exits.classifier_name], [*got, logits], expected):
        if difference(a, b) is not None:
            raise ValueError(
                f"the graph cut at the stages does not reproduce the exit at {name!r} (the model "
                "probably runs differently when traced); exits can still run in PyTorch"
            )


def _input_names(k: int, count: int) -> list[str]:
    return ["images"] if k == 0 else [f"in_{i}" for i in range(count)]


def _output_names(outputs: tuple[torch.Tensor, ...]) -> list[str]:
    return [f"out_{i}" for i in range(len(outputs))]


def _write(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    files: dict[str, str],
) -> None:
    """Export ``module`` to ``path`` with a dynamic batch axis and record its digest."""
    program = torch.export.export(module, args, dynamic_shapes=batch_dynamic_shapes(len(args)), strict=False)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            program,
            (),
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    files[path.name] = sha256(path)


class _quiet_exporter:
    """Silence the ONNX exporter's progress lines (logged at INFO) for the block."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc_info: object) -> None:
        self.logger.setLevel(self.level)


def _manifest(
    exits: EarlyExitModel,
    example: torch.Tensor,
    class_names: Sequence[str] | None,
    stages: list[dict[str, Any]],
    final: str,
    files: dict[str, str],
) -> dict[str, Any]:
    from .. import __version__

    num_classes = int(exits.exit_logits(example[:1])[-1].shape[-1])
    names = list(class_names) if class_names is not None else _model_class_names(exits.model, num_classes)
    if names is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names for a model of {num_classes} classes: {names}")
    costs = exits.exit_costs(example[:1])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gradual_sd_version": __version__,
        "torch_version": torch.__version__,
        "input": {"name": "images", "shape": [None, *example.shape[1:]], "dtype": "float32"},
        "num_classes": num_classes,
        "class_names": names,
        "classifier_name": exits.classifier_name,
        "thresholds": saved_thresholds(exits.thresholds),
        "stages": stages,
        "final_segment": final,
        "flops": {"stages": list(costs.stages), "heads": list(costs.heads), "full": costs.full},
        "files": files,
    }


def _model_class_names(model: nn.Module, num_classes: int) -> list[str] | None:
    """Class names a model records: a Hugging Face config's ``id2label``, timm's
    ``pretrained_cfg['label_names']``."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and len(id2label) == num_classes:
        return [str(id2label[i]) for i in range(num_classes)]
    labels = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if isinstance(labels, (list, tuple)) and len(labels) == num_classes:
        return [str(label) for label in labels]
    return None
