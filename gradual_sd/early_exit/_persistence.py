"""Saving an early-exit model to a folder and rebuilding it without the training code:
:class:`SaveLoadMixin` gives :class:`~gradual_sd.EarlyExitModel` these methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Sequence

import torch
from torch import nn

from .._attention import ACAM, NormalizedACAM
from .._exit_thresholds import loaded_thresholds, saved_thresholds
from .._heads import BottleneckHead, PooledHead
from .._inputs import placement
from .._records import StageInfo
from ..runtime._manifest import SAVED_CONFIG as CONFIG_FILE
from ._probe import example_of_shape

if TYPE_CHECKING:
    from ._model import EarlyExitModel

MODEL_FILE, HEADS_FILE = "model.pt", "heads.pt"
_ATTENTION = {"ACAM": ACAM, "NormalizedACAM": NormalizedACAM, "Identity": None}


class SaveLoadMixin:
    """:class:`~gradual_sd.EarlyExitModel`'s saving and loading."""

    def get_extra_state(self: EarlyExitModel) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def set_extra_state(self: EarlyExitModel, state: dict[str, Any]) -> None:
        self.set_thresholds(state["thresholds"])

    def config(self: EarlyExitModel) -> dict[str, Any]:
        """What :meth:`load` needs besides the weights: stages, layouts, thresholds and, for the
        library's heads, how to rebuild them."""
        return {
            "stages": [stage_entry(stage) for stage in self.stages],
            "classifier_name": self.classifier_name,
            "thresholds": saved_thresholds(self.thresholds),
            "heads": [head_spec(head) for head in self.heads],
            "input_shape": None if self.input_shape is None else list(self.input_shape),
        }

    def save(self: EarlyExitModel, directory: str | Path) -> Path:
        """Write ``model.pt`` (the plain model's state_dict), ``heads.pt`` (the heads') and
        ``early_exit.json`` (:meth:`config`, with :attr:`input_shape`) into ``directory``."""
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
        in training. The default ``example_input`` is of the saved :attr:`input_shape`.
        """
        directory = Path(directory)
        saved = json.loads((directory / CONFIG_FILE).read_text())
        stages = saved_stages(saved)
        trained = f"stages {[s.name for s in stages]}, classifier {saved['classifier_name']!r}"
        load_weights(
            model,
            directory / MODEL_FILE,
            f"build the model exactly as trained ({trained}; the same architecture, num_classes and "
            "inserted modules such as ACAM) and pass it to EarlyExitModel.load",
        )
        head_list = nn.ModuleList(heads if heads is not None else [build_head(s) for s in saved["heads"]])
        load_weights(
            head_list,
            directory / HEADS_FILE,
            "pass heads built as in training, one per stage (or heads=None for the library's heads)",
        )
        where = placement(model)
        if where:
            head_list.to(where["device"])
        if example_input is None and saved.get("input_shape") is not None:  # absent before 0.3
            example_input = example_of_shape(model, tuple(saved["input_shape"]))
        return cls(
            model,
            list(head_list),
            stages,
            saved["classifier_name"],
            thresholds=loaded_thresholds(saved["thresholds"]),
            example_input=example_input,
            check=check,
        )


def stage_entry(stage: StageInfo) -> dict[str, Any]:
    """A stage description as JSON holds it, in ``early_exit.json`` and in an exit folder's
    manifest."""
    return {**stage._asdict(), "shape": list(stage.shape)}


def saved_stages(saved: dict[str, Any]) -> list[StageInfo]:
    """The stage descriptions of a saved config; folders written by gradual-sd 0.2 kept
    parallel lists of names, layouts and prefix-token counts instead."""
    if "stages" in saved:
        return [StageInfo(**{**stage, "shape": tuple(stage["shape"])}) for stage in saved["stages"]]
    return [
        StageInfo(name, (), layout, None, None, prefix)
        for name, layout, prefix in zip(saved["stage_names"], saved["layouts"], saved["num_prefix_tokens"])
    ]


def load_weights(module: nn.Module, path: Path, fix: str) -> None:
    """Load the state_dict saved at ``path`` into ``module``; if its names or shapes do not fit,
    say how (a few examples of each mismatch) and what to do, instead of PyTorch's full dump."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [
        f"{k!r}: saved {tuple(saved[k].shape)}, here {tuple(own[k].shape)}"
        for k in own
        if k in saved and isinstance(own[k], torch.Tensor) and saved[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
            for items, what in (
                ([repr(k) for k in missing], f"of its {len(own)} entries are not in the file"),
                ([repr(k) for k in unexpected], "saved entries have no place in it"),
                (reshaped, "differ in shape"),
            )
            if items
        ]
        raise RuntimeError(
            f"{path} does not fit this {type(module).__name__}: {'; '.join(problems)}. "
            f"It was saved from another model; {fix}"
        )
    module.load_state_dict(saved)


def head_spec(head: nn.Module) -> dict[str, Any] | None:
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


def build_head(spec: dict[str, Any] | None) -> nn.Module:
    if spec is None:
        raise ValueError(
            "the saved config does not describe these heads (not the library's heads at default "
            "settings); build them as in training and pass heads=[...] to EarlyExitModel.load"
        )
    spec = dict(spec)
    factory = {"BottleneckHead": BottleneckHead, "PooledHead": PooledHead}[spec.pop("class")]
    attention = spec.pop("attn_layer")
    return factory(**spec, attn_layer=_ATTENTION[attention] if attention else None)
