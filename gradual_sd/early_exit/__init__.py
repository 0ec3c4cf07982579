"""Early exit: answer each input at the first head that is confident enough, skip the rest.

:class:`EarlyExitModel` keeps a trained model and the auxiliary heads of a
:class:`~gradual_sd.GradualSelfDistiller` and routes every sample through them
(:mod:`.model`, with one pass's bookkeeping in :mod:`.routing` and the construction check in
:mod:`.probe`). The rest works from held-out data (:mod:`.data`): FLOP counting
(:mod:`.costs`), calibration and the trade-off curve (:mod:`.calibration`), the per-exit report
with latency (:mod:`.profiling`, with optional bars from :mod:`.progress`), and saving and
loading (:mod:`.persistence`). The public names are the two below; the modules are internal.
"""

from .model import EarlyExitModel
from .routing import ExitOutput

__all__ = ["EarlyExitModel", "ExitOutput"]
