"""Run an exported exit folder without torch: numpy and onnxruntime only.

``OnnxExitModel(directory)`` opens a folder written by
:meth:`gradual_sd.EarlyExitModel.export_onnx` and answers each sample at the first exit that is
confident enough, as :class:`gradual_sd.EarlyExitModel` does in PyTorch.
"""

from ._exits import ExitResult, OnnxExitModel
from ._manifest import ManifestError

__all__ = ["OnnxExitModel", "ExitResult", "ManifestError"]
