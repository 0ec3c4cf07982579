"""Early exit's calibration policy, pure functions from per-exit confidences to thresholds,
and :class:`Route`, what decides one pass through :meth:`gradual_sd.EarlyExitModel.run`.

:class:`~gradual_sd.EarlyExitModel` (imported from ``gradual_sd``) uses the policy to
calibrate; it works on plain tensors, for users who collect confidences their own way. The
modules of this package are internal: the routing model (``_model``, with one pass's
bookkeeping in ``_routing`` and the construction check in ``_probe``), FLOP counting
(``_costs``), calibration and reports (``_calibration``), saving and loading (``_persistence``)
and the ONNX export (``_split``, ``_deployment``).
"""

from ._policy import (
    ExitCosts,
    choose_thresholds,
    choose_thresholds_within_cost,
    evaluate,
    expected_calibration_error,
    route,
)
from ._routing import Route

__all__ = [
    "ExitCosts",
    "route",
    "evaluate",
    "choose_thresholds",
    "choose_thresholds_within_cost",
    "expected_calibration_error",
    "Route",
]
