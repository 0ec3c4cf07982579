"""Per-sample early exits in ONNX Runtime: one graph per backbone segment and one per head,
routed in numpy, so each sample leaves at the first head confident enough and the rest of the
batch runs on without it.

ONNX Runtime cannot stop a graph early, and an ONNX ``If`` decides for the whole batch; running
the segments one after another and dropping the samples that leave between them is what lets
each sample stop on its own. Needs numpy and onnxruntime only (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._exit_thresholds import checked_thresholds, is_enabled, loaded_thresholds
from ._manifest import read_manifest


class ExitResult(NamedTuple):
    """What :class:`OnnxExitModel` returns, in the input order.

    Attributes:
        logits: ``(N, num_classes)`` float32 logits of the exit that answered each sample.
        exit_index: ``(N,)`` int64: ``0 .. len(stage_names) - 1`` for the auxiliary heads,
            ``len(stage_names)`` for the model's own classifier.
    """

    logits: np.ndarray
    exit_index: np.ndarray


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "OnnxExitModel needs onnxruntime: pip install onnxruntime (or gradual-sd[deploy])"
        ) from error
    return onnxruntime


# Idle intra-op threads do not spin: each graph has its own pool, and threads spinning after one
# graph hold the cores the next graph needs.
NO_SPINNING = ("session.intra_op.allow_spinning", "0")


class _Graph:
    """One ONNX file's session, called with positional arrays."""

    def __init__(self, path: Path, options: Any, providers: Sequence[str]) -> None:
        ort = _onnxruntime()
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.input_names, arrays)))


def top_probability(logits: np.ndarray) -> np.ndarray:
    """Each row's largest softmax probability, ``1 / sum(exp(z - max z))``, in float32."""
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    return (1.0 / np.exp(shifted).sum(axis=-1)).astype(np.float32)


def _size_fix(shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """The fix for images of another size than the folder's: resize them, or export the
    folder at theirs; ``""`` where more than the size differs."""
    if len(shape) != len(expected) + 1 or shape[1] != expected[0]:
        return ""
    size, theirs = "x".join(map(str, expected[1:])), "x".join(map(str, shape[2:]))
    return (
        f": resize them to {size}, or export the folder at their size, "
        f"exits.export_onnx(directory, example_input=images) with a batch of {theirs} images"
    )


class OnnxExitModel:
    """An exit folder written by :meth:`gradual_sd.EarlyExitModel.export_onnx`, run in ONNX
    Runtime with the same per-sample routing as :class:`~gradual_sd.EarlyExitModel`.

    Every file's sha256 is checked against ``manifest.json`` when the folder is opened; a file
    that differs is refused by name. The graphs' intra-op threads do not spin while they wait:
    each graph has its own thread pool, and threads still spinning after one graph take the
    cores the next graph needs (docs/early-exit.md, "The runtime").

    Args:
        directory: The exit folder.
        threads: ONNX Runtime's intra-op threads per graph; ``None`` leaves its default (all
            cores). Set it for reproducible timings.
        providers: Execution providers, best first; default ``["CPUExecutionProvider"]``.
    """

    def __init__(
        self,
        directory: str | Path,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        directory = Path(directory)
        manifest = read_manifest(directory)
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.add_session_config_entry(*NO_SPINNING)
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
                raise ValueError(f"threads must be a positive int or None, got {threads!r}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        stages = manifest["stages"]
        self.manifest = manifest
        self.stage_names: tuple[str, ...] = tuple(stage["name"] for stage in stages)
        self.class_names: list[str] | None = manifest.get("class_names")
        self.num_classes: int = manifest["num_classes"]
        self.input_shape: tuple[int, ...] = tuple(manifest["input"]["shape"][1:])
        self._segments = [_Graph(directory / stage["segment"], options, providers) for stage in stages]
        self._final = _Graph(directory / manifest["final_segment"], options, providers)
        self._heads = [_Graph(directory / stage["head"], options, providers) for stage in stages]
        self._head_inputs = [stage["head_input"] for stage in stages]
        saved = loaded_thresholds(manifest["thresholds"])
        self.thresholds: tuple[float, ...] = checked_thresholds(saved, self.stage_names)

    def set_thresholds(self, thresholds: Sequence[float] | float) -> None:
        """One threshold per head (a single number applies to all): a sample leaves at a head
        when its top softmax probability is ``>=`` the threshold, a probability in ``[0, 1]``;
        ``math.inf`` disables the head."""
        self.thresholds = checked_thresholds(thresholds, self.stage_names)

    def _checked(self, images: object) -> np.ndarray:
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        expected = (None, *self.input_shape)
        if images.ndim == len(self.input_shape):
            raise ValueError(
                f"images of shape {images.shape} have no batch axis; add one (images[None]) for "
                f"the (N, {', '.join(map(str, self.input_shape))}) batches this folder takes"
            )
        if images.ndim != len(expected) or images.shape[1:] != self.input_shape:
            raise ValueError(
                f"images of shape {images.shape}; this folder takes (N, "
                f"{', '.join(map(str, self.input_shape))}) batches (it was exported at that size)"
                f"{_size_fix(images.shape, self.input_shape)}"
            )
        if images.dtype != np.float32:
            raise TypeError(
                f"images are {images.dtype}; the exported graphs take float32: pass "
                "images.astype(np.float32), normalised as in training"
            )
        if images.shape[0] == 0:
            raise ValueError("empty batch: pass at least one image")
        return np.ascontiguousarray(images)

    def __call__(self, images: np.ndarray) -> ExitResult:
        """Classify ``images`` ``(N, C, H, W)`` float32, each sample at the first head whose
        confidence reaches its threshold; later segments run only on the samples still in."""
        carried: list[np.ndarray] = [self._checked(images)]
        batch = carried[0].shape[0]
        logits = np.empty((batch, self.num_classes), dtype=np.float32)
        exit_index = np.full(batch, len(self._segments), dtype=np.int64)
        remaining = np.arange(batch)
        for k, (segment, head) in enumerate(zip(self._segments, self._heads)):
            carried = segment(*carried)
            if not is_enabled(self.thresholds[k]):
                continue
            head_logits = head(carried[self._head_inputs[k]])[0]
            leave = top_probability(head_logits) >= self.thresholds[k]
            if not leave.any():
                continue
            logits[remaining[leave]] = head_logits[leave]
            exit_index[remaining[leave]] = k
            keep = ~leave
            remaining = remaining[keep]
            if remaining.size == 0:
                return ExitResult(logits, exit_index)
            carried = [array[keep] for array in carried]
        logits[remaining] = self._final(*carried)[0]
        return ExitResult(logits, exit_index)

    def __repr__(self) -> str:
        return f"OnnxExitModel(stage_names={list(self.stage_names)}, thresholds={list(self.thresholds)})"
