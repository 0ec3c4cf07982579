"""Select: the one model a run's reports describe, the one its headline accuracy is of: the
epoch picked on validation when the run has a validation split, else the final epoch.

The confusion matrix and the early-exit report come from this model, so they agree with the
headline instead of describing the final epoch next to a headline from another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from .engine import Trained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reported:
    kind: str  # "selected" (picked on validation) or "final": its results' key in metrics.json
    epoch: int
    test: dict  # its test results: accuracies, per head, confusion matrix
    module: nn.Module  # the distiller (heads included) with that epoch's weights

    @property
    def label(self) -> str:
        return f"epoch {self.epoch} ({'picked on validation' if self.kind == 'selected' else 'final'})"


def select(trained: Trained) -> Reported:
    """The reported model; loads the selected epoch's weights into ``trained.module``."""
    final, selected = trained.final, trained.selected
    if selected is None:
        return Reported("final", final["epoch"], final, trained.module)
    if selected["epoch"] != final["epoch"]:
        if trained.selected_state is None:
            log.warning(
                "checkpoint.pt was written before the selected epoch's weights were kept: the "
                "confusion matrix and the early exits describe the final epoch %d, not epoch %d",
                final["epoch"],
                selected["epoch"],
            )
            return Reported("final", final["epoch"], final, trained.module)
        trained.module.load_state_dict(trained.selected_state)
    return Reported("selected", selected["epoch"], selected["test"], trained.module)
