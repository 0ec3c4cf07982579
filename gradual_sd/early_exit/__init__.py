"""Early exit's calibration policy: pure functions from per-exit confidences to thresholds.

:class:`~gradual_sd.EarlyExitModel` (imported from ``gradual_sd``) uses these to calibrate; they
work on plain tensors, for users who collect confidences their own way. The modules of this
package are internal: the routing model (``_model``, with one pass's bookkeeping in
``_routing`` and the construction check in ``_probe``), FLOP counting (``_costs``), calibration
and the trade-off curve (``_calibration``), the per-exit report (``_profiling``), saving and
loading (``_persistence``) and the ONNX export (``_split``, ``_deployment``).
"""

from ._policy import (
    ExitCosts,
    choose_thresholds,
    choose_thresholds_within_cost,
    evaluate,
    expected_calibration_error,
    route,
)

__all__ = [
    "ExitCosts",
    "route",
    "evaluate",
    "choose_thresholds",
    "choose_thresholds_within_cost",
    "expected_calibration_error",
]
